"""Structured configs of the training app (Hydra ConfigStore), and their validation.

Groups (YAML in conf/): model/ (a preset + optional overrides), data/, parallel/, optim/, train/,
experiment/. Hydra rejects unknown keys and wrong types at compose time; `validate_app` checks the
values and their combinations (with the world size) before any process group is created, and every
message names the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from data.config import DataConfig, data_shapes
from data.manifest import apply_manifest
from model.config import ConfigError, DiTConfig, get_preset
from model.flow import FlowConfig
from parallel.mesh import ParallelConfig, ParallelConfigError


@dataclass
class ModelCfg:
    """A preset from model/config.py plus optional overrides (None = the preset's value). The latent
    shape (in_channels, input_size) and the text width/length always come from the data."""

    preset: str = "small-ec"
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mask_ratio: float | None = None
    num_experts: int | None = None
    router: str | None = None
    capacity_factor: float | None = None
    top_k: int | None = None
    tc_capacity_factor: float | None = None
    aux_loss_weight: float | None = None
    group: str | None = None
    group_size: int | None = None
    inference_group: str | None = None
    inference_group_size: int | None = None
    predictor_weight: float | None = None
    predictor_hidden: int | None = None
    threshold_decay: float | None = None
    dynamic_multiplier: float | None = None
    global_pool: bool | None = None
    pool_slack: float | None = None
    expert_matmul: str | None = None


MOE_FIELDS = ("num_experts", "router", "capacity_factor", "top_k", "tc_capacity_factor", "aux_loss_weight",
              "group", "group_size", "inference_group", "inference_group_size", "predictor_weight",
              "predictor_hidden", "threshold_decay", "dynamic_multiplier", "global_pool", "pool_slack",
              "expert_matmul")


@dataclass
class OptimCfg:
    name: str = "adamw"  # adamw | rmsprop (RMSProp with momentum: the paper's)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # rmsprop
    alpha: float = 0.99  # rmsprop smoothing
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainCfg:
    name: str = "ecdit"
    run_dir: str = "runs/${train.name}"  # every rank agrees on it (no timestamp)
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    ema_decay: float = 0.9999  # 0 = no EMA
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    async_ckpt: bool = False
    resume: str = "auto"  # auto (latest in run_dir/checkpoints) | none | path to a step_* dir
    sample_every: int = 0  # sample grid + expert heatmap every N steps (0 = only at the end)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple circles"])
    sample_steps: int = 20
    guidance: float = 4.0
    max_nan_steps: int = 5  # stop after this many non-finite losses in a row
    meta_init: bool = False  # build on the meta device, parallelize, then init (large models)
    peak_tflops: float = 0.0  # device peak for MFU (0: known GPUs by name, else MFU not shown)
    wandb_project: str = "ecdit"
    wandb_mode: str = "offline"  # offline | online | disabled
    threads: int = 0  # torch threads per process (0: cores / processes on this node)
    compile: bool = False  # torch.compile each DiT block (parallel/compile.py; fsdp engine only)


@dataclass
class AppConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    flow: FlowConfig = field(default_factory=FlowConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="app_schema", node=AppConfig)


class AppConfigError(ValueError):
    """A bad training configuration; the message names the field."""


def model_config(mcfg: ModelCfg, dcfg: DataConfig) -> DiTConfig:
    """The network's config: the preset, the overrides, and the latent/text shapes of the data."""
    try:
        shapes = data_shapes(dcfg)
    except ValueError as e:
        raise AppConfigError(str(e)) from e
    top = {k: getattr(mcfg, k) for k in ("depth", "dim", "heads", "kv_heads", "mask_ratio")
           if getattr(mcfg, k) is not None}
    moe = {k: getattr(mcfg, k) for k in MOE_FIELDS if getattr(mcfg, k) is not None}
    top.update(in_channels=shapes.latent_channels, input_size=shapes.latent_size, text_dim=shapes.text_dim,
               text_len=shapes.max_text_len)
    try:
        base = get_preset(mcfg.preset)
        if moe and base.moe is None:
            raise ConfigError(f"model.{next(iter(moe))} given for the dense preset {mcfg.preset!r}")
        return get_preset(mcfg.preset, **top, **({"moe": moe} if moe else {}))
    except ConfigError as e:
        # The preset layer says model.moe.X; the app's field is model.X.
        raise AppConfigError(str(e).replace("model.moe.", "model.")) from e


def validate_app(cfg: AppConfig, world_size: int) -> tuple[DiTConfig, ParallelConfig]:
    """Check everything that can be checked before a process group exists. Latent data: cfg.data takes the
    settings of the shards' manifest.json (data/manifest.py) in place."""
    try:
        cfg.data.validate()
        if cfg.data.kind == "latent":
            cfg.data = apply_manifest(cfg.data)  # encoder settings from the shards' manifest.json
    except ValueError as e:
        raise AppConfigError(str(e)) from e
    mcfg = model_config(cfg.model, cfg.data)
    try:
        pcfg = cfg.parallel.resolved(world_size, mcfg.moe.num_experts if mcfg.moe else None)
    except ParallelConfigError as e:
        raise AppConfigError(str(e).replace("model.moe.", "model.")) from e
    o, t = cfg.optim, cfg.train
    checks = [
        (o.name in ("adamw", "rmsprop"), f"optim.name={o.name!r} must be 'adamw' or 'rmsprop'"),
        (o.lr > 0, f"optim.lr={o.lr} must be > 0"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
        (o.schedule in ("constant", "cosine"), f"optim.schedule={o.schedule!r} must be 'constant' or 'cosine'"),
        (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0"),
        (t.steps >= 1, f"train.steps={t.steps} must be >= 1"),
        (t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1"),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision={t.precision!r} must be auto, fp32 or bf16"),
        (0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1)"),
        (t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1"),
        (t.ckpt_every >= 1, f"train.ckpt_every={t.ckpt_every} must be >= 1"),
        (t.keep_last >= 1, f"train.keep_last={t.keep_last} must be >= 1"),
        (t.max_nan_steps >= 1, f"train.max_nan_steps={t.max_nan_steps} must be >= 1"),
        (t.resume in ("auto", "none") or os.path.isfile(os.path.join(t.resume, "meta.json")),
         f"train.resume={t.resume!r} must be auto, none or a complete step_* checkpoint directory (it has no "
         f"meta.json)"),
        (t.wandb_mode in ("offline", "online", "disabled"),
         f"train.wandb_mode={t.wandb_mode!r} must be offline, online or disabled"),
        (pcfg.engine == "fsdp" or o.name == "adamw", "parallel.engine=deepspeed supports optim.name=adamw only"),
        (not t.compile or pcfg.engine == "fsdp",
         "train.compile=true needs parallel.engine=fsdp (DeepSpeed wraps and hooks the module itself)"),
        (not t.compile or pcfg.ep == 1 or pcfg.dispatcher == "alltoall",
         f"train.compile=true needs parallel.dispatcher=alltoall with expert parallelism (got "
         f"{pcfg.dispatcher!r}: megatron's dispatcher syncs token counts to the host)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise AppConfigError(msg)
    try:
        cfg.flow.validate()
    except ValueError as e:
        raise AppConfigError(str(e)) from e
    return mcfg, pcfg


def to_container(cfg) -> dict:
    """A plain dict of a (structured) config, for JSON and wandb."""
    from omegaconf import OmegaConf
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
