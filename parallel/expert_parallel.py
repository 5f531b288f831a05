"""Expert parallelism applied from outside the model.

Each rank of the expert-parallel mesh holds E_local = E / ep experts: the stacked expert weights
become DTensors sharded on the expert dim (`Shard(0)`; DCP then saves every rank's experts, see the
notes on the silent data-loss trap of plain per-rank parameters). The MoE layer's dispatcher is
replaced by `AllToAllDispatcher`, which moves each expert's slot tokens to the expert's owner and the
outputs back with autograd-aware all-to-alls.

Gradient convention: an expert's weight gradient sums the contributions of the tokens of all ep
ranks, while a dense weight's sums only the local tokens'. Hooks on the experts module (any
dispatcher) scale the gradient that reaches the expert weights by 1/ep (scale 1/ep on the gradient
into the expert output, ep on the gradient out of its input, so token gradients are unchanged).
Averaging dense gradients over all data-parallel ranks and expert gradients over the expert's
data-parallel replicas (FSDP's default) then gives the gradient of the global mean loss. (FSDP2's
`set_gradient_divide_factor` would do the same, but gloo lacks the PREMUL_SUM it needs, and torch 2.13
divides twice on a size-1 mesh.) DeepSpeed divides expert gradients by the whole data-parallel size
instead, which gives the same without the hooks (parallel/deepspeed.py).

Because every routing plan has a fixed number X of slots per expert (expert choice: exactly C tokens
per group; token choice: the capacity), the all-to-all splits are equal and known in advance: no
split exchange and no device-to-host sync. This requires every rank of the group to route the same
number of tokens (same local batch shape), which data-parallel training gives.

This is the plain torch.distributed path (runs on CPU/gloo); parallel/megatron_dispatch.py plugs
megatron-core's dispatchers into the same seam. Under DeepSpeed ZeRO (parallel/deepspeed.py) the experts
stay plain per-rank parameters (`keep_local_experts`) and DeepSpeed reduces their gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

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


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


def _local_range(experts: GroupedExperts, mesh: DeviceMesh) -> tuple[int, int]:
    """(first expert, number of experts) held by this rank of the 1-D expert-parallel `mesh`."""
    if experts.num_experts % mesh.size():
        raise ValueError(f"model.moe.num_experts={experts.num_experts} must be divisible by the "
                         f"expert-parallel size {mesh.size()}")
    local = experts.num_experts // mesh.size()
    return mesh.get_local_rank() * local, local


def shard_experts(experts: GroupedExperts, mesh: DeviceMesh) -> None:
    """Replace the stacked expert weights by DTensors sharded over experts on `mesh`."""
    start, local = _local_range(experts, mesh)
    for name, param in list(experts.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            continue
        # Slice locally (no communication; works on the meta device): rank r keeps experts
        # [r*local, (r+1)*local).
        shard = param.data.narrow(0, start, local).clone()
        experts.register_parameter(name, nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)))


def keep_local_experts(experts: GroupedExperts, mesh: DeviceMesh) -> None:
    """Replace the stacked expert weights by this rank's slice as plain parameters: rank r of the 1-D
    expert-parallel `mesh` keeps experts [r*E_local, (r+1)*E_local)."""
    start, local = _local_range(experts, mesh)
    for name, param in list(experts.named_parameters(recurse=False)):
        experts.register_parameter(name, nn.Parameter(param.data.narrow(0, start, local).clone()))


def _scale_grad_of(out: torch.Tensor, scale: float) -> None:
    if out.requires_grad:
        out.register_hook(lambda grad: grad * scale)


def scale_expert_grads(experts: GroupedExperts, ep: int) -> None:
    """Hooks that scale the experts' weight gradients by 1/ep and leave token gradients unchanged. The
    output's gradient is scaled by a tensor hook, not a view, so that FSDP2's pre-backward hook on the
    module's output stays attached."""
    experts.register_forward_pre_hook(lambda mod, args: (_grad_scale(args[0], float(ep)), *args[1:]))
    experts.register_forward_hook(lambda mod, args, out: _scale_grad_of(out, 1.0 / ep))


def apply_expert_parallel(model: DiT, mesh: DeviceMesh,
                          make_dispatcher: Callable[[DeviceMesh], LocalDispatcher] = AllToAllDispatcher) -> DiT:
    """Shard every MoE layer's experts over the 1-D expert-parallel `mesh` and install the dispatcher
    (`make_dispatcher(mesh)`; default: the equal-split all-to-all). Expects the same full weights on
    every rank (same seed or a broadcast)."""
    for blk in model.blocks:
        if blk.is_moe:
            shard_experts(blk.ffn.experts, mesh)
            scale_expert_grads(blk.ffn.experts, mesh.size())
            blk.ffn.dispatcher = make_dispatcher(mesh)
    return model
