"""Apply all parallelism to a DiT from outside: expert parallelism, activation checkpointing, FSDP2 or
plain data parallelism (DDP).

Typical use (works for a 97B model: nothing is allocated before `to_empty`):

    with torch.device("meta"):
        model = DiT(cfg)
    model = parallelize(model, mesh, pcfg)
    model.to_empty(device=device)
    model.init_weights()

or on an already initialised model (same weights on every rank) to shard it.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from model.dit import DiT

from .compile import compile_blocks
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel
from .fsdp import apply_activation_checkpointing, apply_ddp, apply_fsdp
from .mesh import ParallelConfig


def make_dispatcher_factory(kind: str):
    if kind == "alltoall":
        return AllToAllDispatcher
    from .megatron_dispatch import MegatronDispatcher  # megatron-core: imported only when asked for
    return lambda mesh: MegatronDispatcher(mesh, kind.removeprefix("megatron_"))


def parallelize(model: DiT, mesh: DeviceMesh, cfg: ParallelConfig, torch_compile: bool = False) -> DiT:
    """`cfg` must be resolved (ParallelConfig.resolved) against the world size and the model.
    `torch_compile`: torch.compile each block, after activation checkpointing and before FSDP."""
    if cfg.ep > 1:
        apply_expert_parallel(model, mesh["ep"], make_dispatcher_factory(cfg.dispatcher))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if torch_compile:
        compile_blocks(model)
    if cfg.fsdp:
        apply_fsdp(model, mesh, cfg)
    elif mesh["dp"].size() > 1:
        apply_ddp(model, mesh)
    return model
