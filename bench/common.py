"""Shared plumbing of the bench/ scripts: standard arguments, environment facts, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch


def parser(description: str, preset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--preset", default=preset, help=f"model preset (default: {preset})")
    p.add_argument("--out", type=Path, default=None, help="write the figures as flat JSON to this file")
    return p


def environment(device: str) -> dict:
    env = {"torch_version": torch.__version__, "device": device, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "host_cpus": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def round_robin(step, names, warmup: int, iters: int) -> dict[str, list[float]]:
    """Time `step(name)` for every name, interleaved (warm-up rounds first), so that drift in the
    machine's load hits every variant alike. Returns the per-name list of `iters` timings."""
    for _ in range(warmup):
        for name in names:
            step(name)
    times = {name: [] for name in names}
    for _ in range(iters):
        for name in names:
            times[name].append(step(name))
    return times


def write_json(path: Path | None, figures: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(f"wrote {path}")
