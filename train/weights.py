"""Inference weights of a run: a step checkpoint loaded into an unsharded model (raw or EMA weights, from
either engine), and the safetensors export (consolidated, unsharded weights + config).

    load_weights(step_dir, model, ema=True)     # once train/inference_model.py verified step_dir
    export_safetensors(model, out_dir, weights="ema")
    model = load_exported(out_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from model.config import DiTConfig, config_from_dict, config_to_dict
from model.dit import DiT, build_model

from .rundir import META

EMA_KEY = "ema"  # the `extra` dict under which the torch engine saves the EMA of the parameters
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A step checkpoint written by the DeepSpeed engine (train/backends.py DeepSpeedBackend)."""
    meta = Path(path) / META
    return meta.is_file() and json.loads(meta.read_text()).get("engine") == "deepspeed"


def saved_ema_names(path: str | Path) -> dict[str, str]:
    """{parameter FQN: saved key} of the EMA tensors a step checkpoint holds; empty when it has none
    (train.ema_decay=0). The trainer keys the EMA by the parallelized model's parameter names, so wrapper
    prefixes are dropped here."""
    if is_deepspeed_checkpoint(path):
        from parallel.deepspeed import saved_ema_names as deepspeed_ema_names
        return deepspeed_ema_names(path)
    if not (Path(path) / ".metadata").is_file():
        return {}
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {}
    for key in keys:
        if key.startswith(EMA_KEY + "."):
            name = key[len(EMA_KEY) + 1:]
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            out[name] = key[len(EMA_KEY) + 1:]
    return out


def load_weights(path: str | Path, model: DiT, ema: bool) -> None:
    """Load a DCP step checkpoint into an unsharded model for inference, single process.

    The checkpoint holds the raw model state ("model": parameters and buffers) and, from the torch engine
    with train.ema_decay > 0, the EMA of the parameters only ("ema"). With `ema` the parameters come from
    the EMA; the buffers always come from the raw model state, among them the routers' dynamic-inference
    thresholds (`threshold_E`: an EMA, decay model.moe.threshold_decay, of the raw weights' training-time
    cut-off scores; no EMA-weight counterpart is saved) and the fixed `pos_embed`."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):  # parallel/deepspeed.py full_state_dict: the same weights and buffers
        from parallel.deepspeed import load_fp32_weights
        load_fp32_weights(model, path.parent, path.name, ema=ema)
        return
    params = dict(model.named_parameters())
    state = {"model": get_model_state_dict(model)}
    if ema:
        saved = saved_ema_names(path)
        if set(saved) != set(params):
            raise ValueError(f"checkpoint {path}: its EMA tensors do not match the model's parameters "
                             f"({len(saved)} saved, {len(params)} in the model)")
        state["model"] = {k: v for k, v in state["model"].items() if k not in params}
        state[EMA_KEY] = {saved[n]: p.detach() for n, p in params.items()}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not ema))


# ---- safetensors export -------------------------------------------------------------------------

def export_safetensors(model: DiT, out_dir: str | Path, weights: str = "raw") -> Path | None:
    """Consolidated, unsharded weights (+ config JSON) of a possibly sharded model; collective.
    Rank 0 writes `model.safetensors` and `config.json` and returns the file path. `weights` ("raw" or
    "ema": which weights the model holds) is recorded in the safetensors metadata."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_to_dict(model.cfg)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_file(tensors, out / "model.safetensors", metadata={"config": json.dumps(cfg), "weights": weights})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out / "model.safetensors"


def exported_weights(path: str | Path) -> str:
    """Which weights an export holds: "ema" or "raw" (also for exports written before this was recorded)."""
    path = Path(path)
    with safe_open(path if path.is_file() else path / "model.safetensors", framework="pt") as f:
        return (f.metadata() or {}).get("weights", "raw")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """Build the model described by an export's config.json and load its weights (strictly)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg: DiTConfig = config_from_dict(json.loads((folder / "config.json").read_text()))
    state = load_file(folder / "model.safetensors", device=str(device))
    model = build_model(cfg, device=device).to(next(iter(state.values())).dtype)  # the stored dtype
    model.load_state_dict(state, strict=True)
    return model
