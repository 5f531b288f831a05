"""Distributed arithmetic of a training step, equal on every rank: the global gradient norm (and clipping),
the step's one all-reduce of losses and flags, and reductions of values over the ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to a global L2 norm of `max_norm` (0: only measure); returns that
    norm as a tensor (not read here), equal on every rank and to the one-process norm.

    DTensor gradients (FSDP2, expert parallelism) are grouped by device mesh, since one norm cannot mix
    meshes: dense weights live on the data-parallel mesh, expert weights on ("dp_shard_mod_ep", "ep").
    `get_total_norm` of a group is a DTensor that `full_tensor()` reduces over its mesh; the groups
    combine as the root of their squared sum. Plain gradients (one process, or replicas after DDP's
    all-reduce) are already the same on every rank."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step's figures summed over the ranks (`reduce_step`), read in one host sync."""
    grad_norm: float  # the global gradient norm (already equal on every rank: not summed)
    loss_sum: float  # the ranks' mean flow losses, summed (NaN if one was non-finite)
    ranks_nonfinite: int  # ranks whose loss was non-finite
    ranks_stopping: int  # ranks asked to stop by a signal
    ranks_out_of_data: int  # ranks whose finite stream has no batches for another step
    summed: list[float]  # the sums of the `summed` values over the ranks, in their order
    local: list[float]  # this rank's `local` values, as given


def reduce_step(grad_norm: torch.Tensor, loss_sum: torch.Tensor, stop: bool, out_of_data: bool,
                summed: torch.Tensor, local: torch.Tensor, world: int) -> StepTotals:
    """The step's one all-reduce (float64, so that counts stay exact) and its one host sync, which also
    reads `local` (this rank's values, not reduced): whether to update and whether to stop are host
    branches that every rank must take alike."""
    dev = loss_sum.device
    flags = torch.cat([torch.stack([loss_sum.detach().double(), (~torch.isfinite(loss_sum)).double(),
                                    torch.tensor(float(stop), dtype=torch.float64, device=dev),
                                    torch.tensor(float(out_of_data), dtype=torch.float64, device=dev)]),
                       summed.to(dev, torch.float64)])
    if world > 1:
        dist.all_reduce(flags)
    values = torch.cat([grad_norm.reshape(1).to(flags), flags, local.to(flags)]).tolist()
    n = 5 + summed.numel()
    return StepTotals(values[0], values[1], int(values[2]), int(values[3]), int(values[4]), values[5:n],
                      values[n:])


def over_ranks(value: float, op, world: int, device: torch.device) -> int:
    """`value` reduced with `op` (a dist.ReduceOp) over the ranks: one all-reduce."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=op)
    return int(t.item())


def sum_over_ranks(values: torch.Tensor, world: int) -> list[float]:
    """`values` (on the process group's device) summed over the ranks, in float64 so that counts stay
    exact: one all-reduce."""
    values = values.to(torch.float64)
    if world > 1:
        dist.all_reduce(values)
    return values.tolist()


__all__ = ["StepTotals", "clip_grad_norm_", "over_ranks", "reduce_step", "sum_over_ranks"]
