"""DeepSpeed ZeRO (stage 2 / 3): the alternative training engine for the same DiT model.

    config = ds_config(stage=2, micro_batch=4, lr=1e-4, bf16=True, grad_clip=1.0)
    engine = build_engine(model, config)
    out = train_step(engine, x0_BCHW, ctx_BLT, ctx_mask_BL, FlowConfig(), generator=g)

Runs under `torchrun` / `deepspeed` / `mp.spawn` (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The
`deepspeed` launcher appends `--local_rank=N` to the script's arguments: strip it before parsing.

CPU (DeepSpeed 0.19.8 installed with DS_BUILD_OPS=0): DeepSpeed picks its CPU accelerator by itself
(gloo). Verified here: ZeRO-2 and ZeRO-3 in fp32 on 2 processes (tests/parallel/test_deepspeed.py) and
in bf16 (single-process smoke run), with `"torch_adam": true` (torch's AdamW; without it DeepSpeed
JIT-compiles its CPU Adam at start-up, ~1 min). Not tried here (they need a GPU or compiled ops): fp16
with loss scaling, the fused
CUDA optimizers, ZeRO-Offload with DeepSpeed's compiled CPU Adam, NVMe offload (async I/O op).
Expert parallelism is ours, not DeepSpeed-MoE's: under ZeRO the MoE layers keep the model's local
dispatcher (every rank holds all experts, ZeRO shards them like any weight).

Resharding. A ZeRO checkpoint saved at one data-parallel size does not load at another by itself.
Two routes, both here:
  - `to_universal(ckpt_dir, out_dir)` runs DeepSpeed's `ds_to_universal` conversion (fp32 weights and
    optimizer moments per parameter); an engine built with `ds_config(..., load_universal=True)` then
    `engine.load_checkpoint(out_dir, tag)` continues training at any DP size, optimizer included.
  - `load_fp32_weights(model, ckpt_dir)`: full fp32 weights (`get_fp32_state_dict_from_zero_checkpoint`)
    into a plain model: for export / evaluation (optimizer state is not restored).
DeepSpeed reads its checkpoints with `torch.load(weights_only=False)`: only load checkpoints you trust.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.flow import FlowConfig, flow_loss

STAGES = (2, 3)


def ds_config(stage: int = 2, micro_batch: int = 1, grad_accum: int = 1, lr: float = 1e-4,
              bf16: bool = False, grad_clip: float | None = 1.0, weight_decay: float = 0.0,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              load_universal: bool = False) -> dict:
    """DeepSpeed JSON config (as a dict) from plain arguments. The global batch is
    micro_batch * grad_accum * data-parallel size (DeepSpeed derives it)."""
    if stage not in STAGES:
        raise ValueError(f"deepspeed stage={stage} must be one of {STAGES}")
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"deepspeed {name}={value!r} must be an integer >= 1")
    if not lr > 0:
        raise ValueError(f"deepspeed lr={lr} must be > 0")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"deepspeed grad_clip={grad_clip} must be > 0 (or None for no clipping)")
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if grad_clip is None else float(grad_clip),
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
            "torch_adam": True}},  # torch's AdamW: no JIT build of DeepSpeed's CPU Adam
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": bool(load_universal)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, config: dict, lr_scheduler=None):
    """`deepspeed.initialize` for `model` (weights already initialised, identical on every rank:
    DeepSpeed broadcasts rank 0's anyway). Initialises torch.distributed if needed (gloo on CPU).

    Under ZeRO-3 every `MoEFeedForward` becomes a ZeRO-3 "leaf" module (its router and experts are
    gathered together for its forward and backward): the router returns a `RoutingPlan` dataclass,
    which ZeRO-3's module hooks do not look into, so without this the router weight is not re-gathered
    for backward ("The size of tensor a (0) must match the size of tensor b (D)").
    `lr_scheduler`: a torch scheduler or a callable optimizer -> scheduler (deepspeed.initialize's)."""
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed()
    if config.get("zero_optimization", {}).get("stage") == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from model.moe import MoEFeedForward
        if any(isinstance(m, MoEFeedForward) for m in model.modules()):
            set_z3_leaf_modules(model, [MoEFeedForward])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=config,
                                           lr_scheduler=lr_scheduler)
    return engine


def train_step(engine, x0_BCHW: torch.Tensor, ctx_BLT: torch.Tensor, ctx_mask_BL: torch.Tensor | None,
               flow_cfg: FlowConfig, generator: torch.Generator | None = None, mask_tokens: bool = True) -> dict:
    """One micro-step: flow loss on this rank's micro batch, engine.backward, engine.step (DeepSpeed
    applies the optimizer only at gradient-accumulation boundaries). Returns flow_loss's dict with
    "loss" detached."""
    dt = torch.bfloat16 if engine.bfloat16_enabled() else None
    x0, ctx = (x0_BCHW.to(dt), ctx_BLT.to(dt)) if dt is not None else (x0_BCHW, ctx_BLT)
    out = flow_loss(engine, x0, ctx, ctx_mask_BL, flow_cfg, mask_tokens=mask_tokens, generator=generator)
    engine.backward(out["loss"])
    engine.step()
    out["loss"] = out["loss"].detach()
    return out


def save(engine, ckpt_dir: str | Path, tag: str) -> None:
    """Sharded ZeRO checkpoint (every rank calls it), with the metadata the universal conversion needs."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, \
        UNIVERSAL_CHECKPOINT_VERSION_VALUE

    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=info)


def to_universal(ckpt_dir: str | Path, out_dir: str | Path, tag: str, workers: int = 1) -> Path:
    """DeepSpeed's `ds_to_universal` on checkpoint `ckpt_dir/tag`, into `out_dir/tag` (+ `latest`).
    One process; runs on CPU. Returns out_dir."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    src, dst = Path(ckpt_dir) / tag, Path(out_dir) / tag
    if not src.is_dir():
        raise FileNotFoundError(f"deepspeed checkpoint {src} does not exist")
    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=workers,
                     num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    (Path(out_dir) / "latest").write_text(tag)
    return Path(out_dir)


def load_fp32_weights(model: nn.Module, ckpt_dir: str | Path, tag: str | None = None) -> nn.Module:
    """Full fp32 weights of a ZeRO-2/3 checkpoint (any DP size) into a plain `model` (strict)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, strict=True)
    return model


__all__ = ["ds_config", "build_engine", "train_step", "save", "to_universal", "load_fp32_weights", "STAGES"]
