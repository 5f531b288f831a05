"""Routing pool across data-parallel ranks (DiffMoE's global token pool; synced expert thresholds).

Installed on every Router from outside the model (`install_routing_pool`), as parallel/ installs the
expert-parallel dispatchers: `Router.pool` is that seam (model/routing.py: LocalPool). `gather` all-gathers the
[T, E] routing scores, never the tokens: each rank then keeps its own tokens that reach the pool's
cut-off (model/routing.py: global_expert_choice). `mean` averages the per-expert cut-offs so that every
rank's threshold EMA stays identical. Every rank must hold the same number of tokens (equal local
batches), as in training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RankPool:
    """Pool of the ranks of `group` (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)

    @torch.no_grad()
    def gather(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """[world * T, E] scores of all ranks, rank order (no gradient)."""
        parts = [torch.empty_like(scores_TE) for _ in range(self.world)]
        dist.all_gather(parts, scores_TE.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    @torch.no_grad()
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out / self.world


def install_routing_pool(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Give every Router of `model` (a DiT) a RankPool; returns how many routers got one."""
    routers = model.routers() if hasattr(model, "routers") else []
    for r in routers:
        r.pool = RankPool(group)
    return len(routers)
