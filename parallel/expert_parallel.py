"""Expert parallelism applied from outside the model.

Each rank of the expert-parallel mesh holds E_local = E / ep experts: the stacked expert weights
become DTensors sharded on the expert dim (`Shard(0)`; DCP then saves every rank's experts, see the
notes on the silent data-loss trap of plain per-rank parameters). The MoE layer's dispatcher is
replaced by `AllToAllDispatcher`, which moves each expert's slot tokens to the expert's owner and the
outputs back with autograd-aware all-to-alls.

Because every routing plan has a fixed number X of slots per expert (expert choice: exactly C tokens
per group; token choice: the capacity), the all-to-all splits are equal and known in advance: no
split exchange and no device-to-host sync. This requires every rank of the group to route the same
number of tokens (same local batch shape), which data-parallel training gives.

This is the plain torch.distributed path (runs on CPU/gloo). The megatron-core dispatcher path is
still to come (issue: distributed).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from model.dit import DiT
from model.moe import GroupedExperts, LocalDispatcher
from model.routing import RoutingPlan


class AllToAllDispatcher(LocalDispatcher):
    """gather [E, X, D] -> all-to-all (equal splits of E_local experts) -> local experts on
    [E_local, ep*X, D] -> all-to-all back -> weighted scatter-add on the source rank."""

    def __init__(self, mesh: DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"expert-parallel mesh must be 1-D, got dims {mesh.mesh_dim_names}")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.size = mesh.size()

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> torch.Tensor:
        x_EXD = self.dispatch(x_TD, plan)
        E, X, D = x_EXD.shape
        ep = self.size
        local = E // ep
        # Rank r receives, from every source rank s, the slots of experts [r*local, (r+1)*local).
        recv = all_to_all_single_autograd(x_EXD.contiguous(), None, None, self.group)  # [ep(src)*local, X, D]
        recv = recv.view(ep, local, X, D).transpose(0, 1).reshape(local, ep * X, D)
        y = experts(recv)  # [local, ep*X, D]
        y = y.view(local, ep, X, D).transpose(0, 1).contiguous()  # [ep(dst), local, X, D]
        back = all_to_all_single_autograd(y.view(E, X, D), None, None, self.group)  # [E, X, D], expert order
        return self.combine(back, plan)


def shard_experts(experts: GroupedExperts, mesh: DeviceMesh) -> None:
    """Replace the stacked expert weights by DTensors sharded over experts on `mesh`."""
    if experts.num_experts % mesh.size():
        raise ValueError(f"model.moe.num_experts={experts.num_experts} must be divisible by the "
                         f"expert-parallel size {mesh.size()}")
    for name, param in list(experts.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            continue
        experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))


def apply_expert_parallel(model: DiT, mesh: DeviceMesh,
                          make_dispatcher: Callable[[DeviceMesh], LocalDispatcher] = AllToAllDispatcher) -> DiT:
    """Shard every MoE layer's experts over the 1-D expert-parallel `mesh` and install the dispatcher
    (`make_dispatcher(mesh)`; default: the equal-split all-to-all). Expects the same full weights on
    every rank (same seed or a broadcast)."""
    for blk in model.blocks:
        if blk.is_moe:
            shard_experts(blk.ffn.experts, mesh)
            blk.ffn.dispatcher = make_dispatcher(mesh)
    return model
