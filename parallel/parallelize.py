"""Apply all parallelism to a DiT from outside, in one fixed order whatever the world size: expert
parallelism, activation checkpointing, torch.compile of each block, FSDP2 or plain data parallelism (DDP),
and the routing pool across the data-parallel ranks; under DeepSpeed ZeRO only its expert-parallel
declaration and the routing pool (the engine wraps the rest itself).

    model = build_parallel(mcfg, pcfg, world, device, seed=0)   # builds, wraps and initialises

or, by hand (works for a 97B model: nothing is allocated before `to_empty`):

    with torch.device("meta"):
        model = DiT(cfg)
    model = parallelize(model, mesh, pcfg)
    model.to_empty(device=device)
    model.init_weights()
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from model.config import DiTConfig
from model.dit import DiT, build_model

from .compile import compile_blocks
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel
from .fsdp import apply_activation_checkpointing, apply_ddp, apply_fsdp
from .mesh import ParallelConfig, build_mesh
from .routing_pool import install_routing_pool


def make_dispatcher_factory(kind: str):
    if kind == "alltoall":
        return AllToAllDispatcher
    from .megatron_dispatch import MegatronDispatcher  # megatron-core: imported only when asked for
    return lambda mesh: MegatronDispatcher(mesh, kind.removeprefix("megatron_"))


def parallelize(model: DiT, mesh: DeviceMesh | None, cfg: ParallelConfig, torch_compile: bool = False) -> DiT:
    """Every wrapping of `model`; `mesh` None: one process. `cfg` must be resolved (ParallelConfig.resolved)
    against the world size and the model. `torch_compile`: torch.compile each block, after activation
    checkpointing and before FSDP; idempotent."""
    if cfg.engine == "deepspeed":
        if cfg.ep > 1:
            from .deepspeed import apply_expert_parallel_zero
            apply_expert_parallel_zero(model, mesh["ep"], cfg.zero_stage, make_dispatcher_factory(cfg.dispatcher))
    elif cfg.ep > 1:
        apply_expert_parallel(model, mesh["ep"], make_dispatcher_factory(cfg.dispatcher))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if torch_compile:
        compile_blocks(model)
    if mesh is not None and cfg.engine != "deepspeed":
        if cfg.fsdp:
            apply_fsdp(model, mesh, cfg)
        elif mesh["dp"].size() > 1:
            apply_ddp(model, mesh)
    if mesh is not None:  # expert thresholds (and DiffMoE's global pool) span the data-parallel ranks
        install_routing_pool(model)
    return model


def build_parallel(mcfg: DiTConfig, cfg: ParallelConfig, world: int, device: torch.device, seed: int = 0,
                   meta_init: bool = False, torch_compile: bool = False) -> DiT:
    """The model of `mcfg` on `device`, parallelized over `world` ranks (a mesh when world > 1) and
    initialised: on the meta device, wrapped, then `to_empty` and `init_weights` under `seed` (`meta_init`,
    not with DeepSpeed, which needs the full weights first), or built with its weights (the same on every
    rank) and then wrapped."""
    on_meta = meta_init and cfg.engine != "deepspeed"
    mesh = build_mesh(cfg, world, device.type) if world > 1 else None
    model = parallelize(_unwrapped(mcfg, device, seed, on_meta), mesh, cfg, torch_compile)
    if on_meta:  # nothing was allocated before this
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()
    return model


def _unwrapped(mcfg: DiTConfig, device: torch.device, seed: int, on_meta: bool) -> DiT:
    if not on_meta:
        return build_model(mcfg, device=device, seed=seed)
    with torch.device("meta"):
        return DiT(mcfg)


__all__ = ["build_parallel", "make_dispatcher_factory", "parallelize"]
