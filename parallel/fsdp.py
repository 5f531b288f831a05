"""Data parallelism for the DiT: FSDP2 (`fully_shard`: one unit per block, experts as their own unit on
the expert-data-parallel dims, the root last) or plain replicas (`replicate`, DDP). Optional activation
checkpointing per block."""

from __future__ import annotations

import torch
from torch.distributed._composable import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.dit import DiT

from .mesh import ParallelConfig


def _dense_mesh(mesh: DeviceMesh, cfg: ParallelConfig) -> DeviceMesh:
    return mesh["dp_replicate", "dp_shard"] if cfg.dp_replicate > 1 else mesh["dp_shard"]


def _expert_mesh(mesh: DeviceMesh, cfg: ParallelConfig) -> DeviceMesh:
    return mesh["dp_replicate", "dp_shard_mod_ep"] if cfg.dp_replicate > 1 else mesh["dp_shard_mod_ep"]


def apply_activation_checkpointing(model: DiT) -> None:
    """Recompute each block in backward (saves activations at ~1/3 more compute)."""
    for i, blk in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)


def apply_fsdp(model: DiT, mesh: DeviceMesh, cfg: ParallelConfig) -> DiT:
    """Shard dense weights over all data-parallel ranks and expert weights over the ranks that hold
    the same experts; gradients are averaged over each (see the gradient convention in
    parallel/expert_parallel.py)."""
    mp = None
    if cfg.param_dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {} if mp is None else {"mp_policy": mp}
    for blk in model.blocks:
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        if getattr(inner, "is_moe", False) and cfg.ep > 1:
            experts = inner.ffn.experts
            fully_shard(experts, mesh=_expert_mesh(mesh, cfg), **kw)
        fully_shard(blk, mesh=_dense_mesh(mesh, cfg), **kw)
    fully_shard(model, mesh=_dense_mesh(mesh, cfg), **kw)
    return model


def apply_ddp(model: DiT, mesh: DeviceMesh) -> DiT:
    """Replicas over the "dp" ranks whose gradients DDP averages in buckets during backward. Buffers are
    not broadcast: the routers' threshold EMAs stay equal through their RankPool (parallel/routing_pool.py).
    Unused parameters are looked for, since some are unused in a whole run (the null text when
    flow.text_drop_prob=0). Initialised lazily at the first forward, so it applies to a meta-device model
    before `to_empty` / `init_weights`; DDP then broadcasts rank 0's weights."""
    replicate(model, process_group=mesh["dp"].get_group(), forward_sync_buffers=False,
              find_unused_parameters=True)
    return model
