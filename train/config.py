"""Structured configs of the training app (Hydra ConfigStore), and their validation.

One typed tree: the dataclasses below (and the model, data, flow and parallel ones they hold) are the
Hydra schema. Groups: model (one option per preset of model/config.py PRESETS, stored by `register`),
and the YAML options of conf/data, conf/parallel, conf/optim, conf/train, conf/experiment. Hydra rejects
unknown keys and wrong types at compose time; `validate_app` checks the values and their combinations
(with the world size) before any process group is created, raising one `ConfigError` whose message
starts with the field's dotted path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from data.config import DataConfig, data_shapes
from data.manifest import apply_manifest
from model import extras
from model.config import PRESETS, SHAPE_FIELDS, ConfigError, DiTConfig, config_for_data, get_preset
from model.flow import FlowConfig
from parallel.mesh import ParallelConfig


@dataclass
class ModelSpec(DiTConfig):
    """The `model` group: a preset of `model.config.PRESETS` (`model=<name>`, stored in Hydra's ConfigStore
    by `register`) whose every field can be overridden (`model.depth=4`, `model.moe.num_experts=16`).

    The four shape fields are null: the data decides them (latent channels and size, text width and
    length; model/config.py `config_for_data`). Setting one asserts it: a value the data does not give is refused."""

    in_channels: int | None = None
    input_size: int | None = None
    text_dim: int | None = None
    text_len: int | None = None


def model_spec(preset: str) -> ModelSpec:
    """The `model` group node of a preset: its values, shape fields left to the data."""
    cfg = get_preset(preset)
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DiTConfig)}
    return ModelSpec(**{**values, **dict.fromkeys(SHAPE_FIELDS)})


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
    # [] = no sample grid (neither every sample_every steps nor at the end)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple circles"])
    sample_steps: int = 20
    guidance: float = 4.0
    max_nan_steps: int = 5  # stop after this many non-finite losses in a row
    # No optimizer step (or checkpoint) completed for this long: every rank writes its Python stacks to
    # run_dir/stalls/ and exits (train/watchdog.py); 0 = off. Keep it above parallel.timeout_s, which
    # catches a single stuck rank first.
    stall_timeout_s: float = 1800.0
    meta_init: bool = False  # build on the meta device, parallelize, then init (large models)
    peak_tflops: float = 0.0  # device peak for MFU (0: known GPUs by name, else MFU not shown)
    wandb_project: str = "ecdit"
    wandb_mode: str = "offline"  # offline | online | disabled
    threads: int = 0  # torch threads per process (0: cores / processes on this node)
    compile: bool = False  # torch.compile each DiT block (parallel/compile.py; fsdp engine only)
    # At the end of the run, check that every copy of a replicated weight or buffer is identical on the
    # ranks that hold one (parallel/replicas.py; one all-gather of 3 numbers per tensor); stop if not.
    check_replicas: bool = True


@dataclass
class AppConfig:
    model: ModelSpec = field(default_factory=lambda: model_spec("small-ec"))
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    flow: FlowConfig = field(default_factory=FlowConfig)


def register() -> None:
    """The app schema and one `model` group option per preset (the registry is `model.config.PRESETS`)."""
    cs = ConfigStore.instance()
    cs.store(name="app_schema", node=AppConfig)
    for name in PRESETS:
        cs.store(group="model", name=name, node=model_spec(name))


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides: list[str]):
    """The composed (unvalidated) DictConfig of `python -m train <overrides>`: Hydra's compose API over
    conf/, no run directory, no logging set-up. Call `register` first."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def compose_app(overrides: list[str]) -> AppConfig:
    """The AppConfig that `python -m train <overrides>` trains: for tools and tests that validate configs
    in process."""
    from omegaconf import OmegaConf

    register()
    return OmegaConf.to_object(compose(overrides))


def validate_app(cfg: AppConfig, world_size: int) -> tuple[DiTConfig, ParallelConfig]:
    """Check everything that can be checked before a process group exists, in one pass that raises
    `ConfigError` naming the field. Latent data: cfg.data takes the settings of the shards' manifest.json
    (data/manifest.py) in place."""
    bad = non_finite(cfg)
    if bad:
        raise ConfigError(f"{bad[0]}={bad[1]} must be a finite number")
    for ok, msg in _app_checks(cfg):
        if not ok:
            raise ConfigError(msg)
    cfg.data.validate()
    if cfg.data.kind == "latent":
        cfg.data = apply_manifest(cfg.data)  # encoder settings from the shards' manifest.json
    shapes = data_shapes(cfg.data)
    pcfg = cfg.parallel.resolved(world_size, cfg.model.moe.num_experts if cfg.model.moe else None)
    extras.check(cfg)  # an optional dependency the config needs (DeepSpeed, megatron-core) is installed
    cfg.flow.validate()
    mcfg = config_for_data(cfg.model, shapes, cfg.data.batch_size)
    return mcfg, pcfg


def non_finite(cfg, prefix: str = "") -> tuple[str, object] | None:
    """(dotted name, value) of the first float field of a config tree (dataclasses; floats in lists and
    tuples too) that is NaN or infinite, or None: a NaN passes every comparison check unnoticed."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found = non_finite(value, name + ".")
            if found:
                return found
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return name, list(value) if isinstance(value, (list, tuple)) else value
    return None


def _app_checks(cfg: AppConfig) -> list[tuple[bool, str]]:
    """(holds, message) for the optimizer, trainer and cross-group rules."""
    o, t, p = cfg.optim, cfg.train, cfg.parallel
    preset = PRESETS.get(cfg.model.name)
    return [
        (preset is None or preset.moe is not None or cfg.model.moe is None,
         f"model.moe is set but model={cfg.model.name} is a dense preset: an experiment config or override gave "
         f"it MoE fields, which would make it an MoE model; choose an MoE preset, or set model.name to build an "
         f"MoE from this preset on purpose"),
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
        (t.sample_steps >= 1, f"train.sample_steps={t.sample_steps} must be >= 1 (Euler steps of the sample grid)"),
        (t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0 (0: only at the end)"),
        (t.sample_every == 0 or len(t.sample_prompts) > 0,
         f"train.sample_every={t.sample_every} needs train.sample_prompts (it is empty: no sample grid)"),
        (t.guidance >= 0, f"train.guidance={t.guidance} must be >= 0 (classifier-free guidance scale; 1: none)"),
        (t.stall_timeout_s >= 0, f"train.stall_timeout_s={t.stall_timeout_s} must be >= 0 (0: no step watchdog)"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         f"optim.betas={list(o.betas)} must be two values in [0, 1)"),
        (t.resume in ("auto", "none") or os.path.isfile(os.path.join(t.resume, "meta.json")),
         f"train.resume={t.resume!r} must be auto, none or a complete step_* checkpoint directory (it has no "
         f"meta.json)"),
        (t.wandb_mode in ("offline", "online", "disabled"),
         f"train.wandb_mode={t.wandb_mode!r} must be offline, online or disabled"),
        (p.engine == "fsdp" or o.name == "adamw", "parallel.engine=deepspeed supports optim.name=adamw only"),
        (not p.activation_checkpointing or p.engine == "fsdp",
         "parallel.activation_checkpointing=true needs parallel.engine=fsdp (the DeepSpeed engine does not wrap "
         "the blocks)"),
        (not t.compile or p.engine == "fsdp",
         "train.compile=true needs parallel.engine=fsdp (DeepSpeed wraps and hooks the module itself)"),
        (not t.compile or p.ep == 1,
         f"train.compile=true needs parallel.ep=1 (got {p.ep}): the sharded experts are DTensors and their "
         f"own FSDP unit, which break the compiled block's graph"),
    ]


def to_container(cfg) -> dict:
    """A plain dict of a (structured) config, for JSON and wandb."""
    from omegaconf import OmegaConf
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
