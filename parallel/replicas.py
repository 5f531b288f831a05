"""Check that every copy of a replicated tensor is the same on every rank that holds one.

Data parallelism keeps copies: plain replicas hold whole dense weights, FSDP2/HSDP repeat each shard over
the replicate dim, and each expert is repeated over its expert-data-parallel ranks. A wrong reduction
(a gradient not all-reduced, clipped by a rank-local norm, averaged over the wrong group) makes the
copies drift apart while training goes on; a checkpoint then silently keeps one of them. `diverged`
compares fingerprints of all copies in one all-gather.

Which ranks hold the same copy: for a DTensor, the ranks whose mesh coordinates agree on every dim the
tensor is sharded over; for a DeepSpeed expert parameter (`allreduce=False`), the ranks with the same
expert-parallel rank; for a ZeRO-3 partitioned parameter, none (each rank owns its own partition);
for any other tensor, all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _holder(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the local data, an id shared exactly by the ranks that must hold the same data)."""
    if isinstance(t, DTensor):
        coord = t.device_mesh.get_coordinate() or []
        shard_coords = [c for c, p in zip(coord, t.placements) if p.is_shard()]
        return t.to_local(), sum((c + 1) * 4096**i for i, c in enumerate(shard_coords))
    if hasattr(t, "ds_tensor"):  # ZeRO-3: this rank's partition only
        return t.ds_tensor, 1 + dist.get_rank()
    if getattr(t, "allreduce", True) is False:  # DeepSpeed MoE convention: an expert-parallel slice
        from deepspeed.utils import groups
        return t, -1 - groups._get_expert_parallel_rank(t.group_name)
    return t, 0


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, index-weighted sum] in float64: equal copies give equal values; a change of
    one element by one ulp, or a permutation, changes them."""
    x = t.detach().reshape(-1).double()
    ramp = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) / max(1, x.numel())
    return torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()])


def diverged(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` whose copies differ between ranks (collective;
    every rank gets the same list). Empty in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    names, prints, ids = [], [], []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        data, holder = _holder(t)
        names.append(name)
        prints.append(_fingerprint(data).to(device))  # no host sync per tensor
        ids.append(holder)
    local = torch.cat([torch.stack(prints).reshape(-1), torch.tensor(ids, dtype=torch.float64, device=device)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    n = len(names)
    rows = [g.cpu() for g in gathered]
    bad = []
    for i, name in enumerate(names):
        seen: dict[float, torch.Tensor] = {}
        for row in rows:
            holder, fp = float(row[3 * n + i]), row[3 * i:3 * i + 3]
            if holder in seen and not torch.equal(seen[holder], fp):
                bad.append(name)
                break
            seen.setdefault(holder, fp)
    return bad


__all__ = ["diverged"]
