"""Run metrics: wandb (offline by default; a wandb failure never stops training), a console progress
line, and a JSONL log of every logged step (metrics.jsonl in the run directory). Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch

from model import extras

# Dense bf16 peak FLOP/s of known accelerators, for MFU (train.peak_tflops overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def moe_scalar_tensors(moe_stats: list[dict[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """Per MoE layer: load of every expert (fraction of the layer's slots), fraction of tokens processed
    by 0, 1, ..., E experts, router entropy, realised capacity per expert, token choice's drop rate / aux
    loss, DiffMoE's predictor accuracy / BCE, the global pool's overflow and the mean expert threshold.
    Their names and one flat float64 tensor of their values, on the stats' device (nothing read)."""
    names: list[str] = []
    parts: list[torch.Tensor] = []

    def add(keys: list[str], values: torch.Tensor) -> None:
        names.extend(keys)
        parts.append(values.detach().double().reshape(-1))

    for i, s in enumerate(moe_stats):
        p = f"moe/layer{i}"
        load = s["tokens_per_expert"].float()
        experts = range(load.numel())
        add([f"{p}/load/e{e}" for e in experts], load / load.sum().clamp_min(1))
        frac = s["experts_per_token_frac"]
        add([f"{p}/tokens_by_{k}_experts" for k in range(frac.numel())], frac)
        add([f"{p}/router_entropy"], torch.as_tensor(s["router_entropy"], device=load.device))
        add([f"{p}/load_cv"], load.std(unbiased=False) / load.mean().clamp_min(1e-9))
        # tokens the expert processed / tokens of the layer
        add([f"{p}/capacity_frac/e{e}" for e in experts], load / max(1, s["expert_count"].numel()))
        for key in ("drop_rate", "aux_loss", "predictor_acc", "predictor_bce", "pool_overflow", "threshold_mean"):
            if key in s:
                add([f"{p}/{key}"], torch.as_tensor(s[key], device=load.device))
    return names, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def moe_scalars(moe_stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """`moe_scalar_tensors` read to the host: {name: value}."""
    names, values = moe_scalar_tensors(moe_stats)
    return dict(zip(names, values.tolist()))


class Metrics:
    def __init__(self, run_dir: Path, config: dict, enabled: bool, wandb_mode: str = "offline",
                 project: str = "ecdit", name: str = "run"):
        self.enabled = enabled
        self.run = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if wandb_mode == "disabled":
            return
        if not extras.installed("wandb"):  # metrics.jsonl only, as with wandb_mode=disabled
            print(f"[metrics] {extras.message('wandb', f'train.wandb_mode={wandb_mode}')} (metrics.jsonl only)",
                  file=sys.stderr)
            return
        try:
            import wandb
            id_file = run_dir / "wandb_id.txt"  # one wandb run across resumes
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            mode = wandb_mode if (wandb_mode != "online" or os.environ.get("WANDB_API_KEY")) else "offline"
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                                  dir=str(run_dir), config=config)
        except Exception as e:  # noqa: BLE001 - metrics must never kill training
            print(f"[metrics] wandb disabled: {type(e).__name__}: {e}", file=sys.stderr)
            self.run = None

    @property
    def wandb_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, data: dict, step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **data}) + "\n")
        self.jsonl.flush()
        self._wandb(lambda run: run.log(data, step=step))

    def log_image(self, key: str, image, step: int, caption: str = "") -> None:
        if self.enabled:
            self._wandb(lambda run: run.log({key: __import__("wandb").Image(image, caption=caption)}, step=step))

    def _wandb(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as e:  # noqa: BLE001
            print(f"[metrics] wandb error ignored: {type(e).__name__}: {e}", file=sys.stderr)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            self._wandb(lambda run: run.finish())


class Progress:
    """Console line: step, loss, step/s, samples/s, tokens/s, ETA, MFU."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.t0, self.s0 = total_steps, time.perf_counter(), start_step

    def line(self, step: int, loss: float, samples: int, tokens: int, flops: float | None,
             peak: float | None, extra: str = "") -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(step - self.s0, 1)
        sps = steps / dt
        eta = (self.total - step) / sps
        mfu = f" MFU {flops * sps / peak:6.1%}" if (flops and peak) else ""
        return (f"step {step:>7}/{self.total} loss {loss:.4f} | {sps:5.2f} step/s {samples * sps:8.1f} samples/s "
                f"{tokens * sps:9.0f} tokens/s | ETA {_hms(eta)}{mfu}{extra}")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
