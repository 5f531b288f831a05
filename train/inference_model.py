"""The one way to get a trained model for inference: from a `step_*` checkpoint directory, a run's
checkpoint root (its latest complete step) or a safetensors export folder, return the model, its run
config and which weights were loaded; plus the encoder settings and checks that come with that run config.
A step checkpoint is verified first (train/rundir.py: its files against the sizes and CRC-32s its meta.json
records); nothing is loaded from a damaged one.

A step directory's model is built from its config.json["model_resolved"] (the training app), or
["model"] when that is a full DiTConfig dict. Weights: "ema" (the default) takes the EMA of the parameters
that both engines save with train.ema_decay > 0 (DCP or DeepSpeed checkpoints) and falls back to the raw weights, with a printed
note, when the checkpoint has none; "raw" takes the trained parameters. Buffers, the routers'
dynamic-inference thresholds among them, come from the raw model state either way (the EMA covers
parameters only).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from model.config import ConfigError, DiTConfig, config_from_dict
from model.dit import DiT, build_model
from train.rundir import META, complete_checkpoints, damage
from train.weights import exported_weights, load_exported, load_weights, saved_ema_names
from train.generate import SampleError

WEIGHTS = ("ema", "raw")
# DataConfig fields the sampler takes from a run's config.json["data"] (encoders only; no shards).
DATA_KEYS = ("text_encoder", "text_encoder_path", "max_text_len", "vae", "vae_path", "image_size", "encoder_dtype")


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("export" | "step", folder) for a --checkpoint argument."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"--checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "export", path.parent
        raise SampleError(f"--checkpoint {path} is a file; give a step_* directory, a checkpoint root or an "
                          f"export folder")
    if (path / "model.safetensors").is_file():
        return "export", path
    steps = [path] if (path / META).is_file() else complete_checkpoints(path)
    if steps:
        return "step", _whole(steps)
    raise SampleError(f"--checkpoint {path} holds no complete step_* checkpoint (with meta.json) and no "
                      f"model.safetensors export")


def _whole(steps: list[Path]) -> Path:
    """The newest of `steps` (oldest first), once verified; SampleError naming the damage otherwise."""
    why = damage(steps[-1])
    if why is None:
        return steps[-1]
    older = f": give an older step_* directory, e.g. {steps[-2]}" if len(steps) > 1 else ""
    raise SampleError(f"checkpoint {steps[-1]} is damaged ({why}){older}")


def pick_weights(kind: str, folder: Path, weights: str, log: Callable[[str], None] = print) -> str:
    """The weights to load for --weights: "ema" when the checkpoint holds them, else "raw" with a printed
    note; an export holds one set, and asking it for raw weights it does not hold is an error."""
    if weights not in WEIGHTS:
        raise SampleError(f"--weights {weights!r} must be one of {WEIGHTS}")
    held = ({exported_weights(folder)} if kind == "export"
            else {"raw", "ema"} if saved_ema_names(folder) else {"raw"})
    if weights in held:
        return weights
    if weights == "raw":
        raise SampleError(f"--weights raw: the export {folder} holds EMA weights only; export the checkpoint "
                          f"again with --weights raw")
    log(f"--weights ema: {folder} holds no EMA weights (trained with train.ema_decay=0); using the raw weights")
    return "raw"


def _run_config(folder: Path) -> tuple[dict, DiTConfig]:
    """(run config dict, model config) of a step checkpoint's config.json."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise SampleError(f"--checkpoint {folder} has no config.json (the run config with the model under "
                          f"'model'); save with Checkpointer.save(..., config=...)")
    run_cfg = json.loads(cfg_file.read_text())
    # The training app stores its model group (preset + overrides) under "model" and the full DiTConfig
    # under "model_resolved"; a plain run config holds the DiTConfig under "model".
    key = "model_resolved" if isinstance(run_cfg, dict) and "model_resolved" in run_cfg else "model"
    if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get(key), dict):
        raise SampleError(f"--checkpoint {folder}: config.json has no 'model_resolved' or 'model' section")
    try:
        return run_cfg, config_from_dict(run_cfg[key])
    except (ConfigError, TypeError) as e:
        raise SampleError(f"--checkpoint {folder}: config.json[{key!r}] is not a model config: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
               log: Callable[[str], None] = print) -> tuple[DiT, dict, Path, str]:
    """(model in eval mode, run config dict ({} for an export), resolved folder, weights loaded: "ema" or
    "raw") for --checkpoint and --weights (see `pick_weights`; buffers such as the routers' thresholds
    come from the raw model state: `train.checkpoint.load_weights`)."""
    kind, folder = resolve_checkpoint(path)
    if kind == "export":
        if not (folder / "config.json").is_file():
            raise SampleError(f"--checkpoint {folder}: export has model.safetensors but no config.json")
        used = pick_weights(kind, folder, weights, log)
        return load_exported(folder, device=device).eval(), {}, folder, used
    run_cfg, cfg = _run_config(folder)
    used = pick_weights(kind, folder, weights, log)
    model = build_model(cfg, device=device)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            load_weights(folder, model, ema=used == "ema")
        except ValueError as e:
            raise SampleError(f"--weights ema: {e}") from None
    return model.eval(), run_cfg, folder, used


def data_config(run_cfg: dict, model_cfg: DiTConfig, **overrides):
    """DataConfig for the encoders: the run's config.json["data"] (encoder fields only), else the
    DataConfig defaults with max_text_len = the model's text_len; non-None `overrides` win."""
    from data.config import DataConfig

    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    kw = {k: data[k] for k in DATA_KEYS if k in data}
    kw.setdefault("max_text_len", model_cfg.text_len)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DataConfig(**kw)
    except ValueError as e:
        raise SampleError(f"data options: {e}") from None


def check_compatible(cfg: DiTConfig, text_encoder, vae, dcfg) -> None:
    """The encoders must produce what the model was built for."""
    dim = getattr(text_encoder, "dim", None)
    if dim is not None and dim != cfg.text_dim:
        raise SampleError(f"--text-encoder {dcfg.text_encoder} gives {dim}-dim embeddings but the model has "
                          f"text_dim={cfg.text_dim}; pass the run's --text-encoder / --text-encoder-path")
    ch = getattr(vae, "latent_channels", None)
    if ch is not None and ch != cfg.in_channels:
        raise SampleError(f"--vae {dcfg.vae} has {ch} latent channels but the model has "
                          f"in_channels={cfg.in_channels}; pass the run's --vae / --vae-path")

