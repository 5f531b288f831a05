"""The config matrix: every parallel option x expert parallelism x router x data kind, on 2 gloo processes.

    python bench/config_matrix.py                  # all 80 cells (~25 s per trained cell on 2 cores)
    python bench/config_matrix.py --only fsdp_ep   # cells whose name contains every --only word

Each cell is validated as the trainer validates (`train.config.validate_app` at world size 2, before any
process group): refused with one line naming the field, or trained for 2 steps with `torchrun
--nproc_per_node=2`, and then it works only if the run exits 0 and the trainer's end-of-run replica check
(parallel/replicas.py) finds every copy of every replicated weight and buffer identical across ranks.
Prints the table and writes JSON (`--out`); tests/train/test_config_matrix.py runs a subset.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARALLEL = ("single", "fsdp", "fsdp_ep", "deepspeed_zero2", "deepspeed_zero3")
EP = (1, 2)
ROUTERS = {"dense": "small-dense", "expert_choice": "small-ec", "token_choice": "small-tc", "diffmoe": "small-diffmoe"}
DATA = ("image", "latent")
TINY = ["model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1", "train.steps=2", "train.log_every=1",
        "train.ckpt_every=2", "data.batch_size=4", "data.shuffle_buffer=50", "data.num_workers=0",
        "train.sample_steps=1", "train.sample_prompts=[a red circle]", "train.threads=1"]
TINY_MOE = ["model.moe.num_experts=4", "model.moe.group_size=256", "model.moe.inference_group_size=256"]
REPLICAS_OK = "replicas: every copy of every replicated weight and buffer is identical across ranks"


@dataclass(frozen=True)
class Cell:
    parallel: str
    ep: int
    router: str
    data: str

    @property
    def name(self) -> str:
        return f"{self.parallel}/ep{self.ep}/{self.router}/{self.data}"

    def overrides(self, shards: dict[str, str]) -> list[str]:
        """Hydra overrides of this cell; `shards`: {"image": pattern, "latent": pattern}."""
        data = ["data=shapes"] if self.data == "image" else ["data=latent_shards"]
        return [f"model={ROUTERS[self.router]}", f"parallel={self.parallel}", f"parallel.ep={self.ep}", *data,
                f"data.shards='{shards[self.data]}'", *TINY, *(TINY_MOE if self.router != "dense" else [])]


def cells() -> list[Cell]:
    return [Cell(*c) for c in itertools.product(PARALLEL, EP, ROUTERS, DATA)]


def refusal(cell: Cell, shards: dict[str, str], world: int = 2) -> str | None:
    """The one-line message validation refuses `cell` with (before any process group), or None."""
    from model.config import ConfigError
    from train.config import compose_app, validate_app

    try:
        validate_app(compose_app(cell.overrides(shards)), world)
    except ConfigError as e:
        return str(e)
    return None


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**out, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def train(cell: Cell, shards: dict[str, str], run_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 steps of `cell` on 2 gloo processes (torchrun), into run_dir."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *cell.overrides(shards), f"train.run_dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def verdict(proc: subprocess.CompletedProcess) -> str:
    """"works" (exit 0, replicas identical), else the first error line."""
    if proc.returncode == 0 and REPLICAS_OK in proc.stdout and "Traceback" not in proc.stderr:
        return "works"
    lines = proc.stderr.splitlines()
    ours = [line for line in lines if line.startswith("error:")]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return "FAILS: " + (ours[:1] or raised[-1:] or [f"exit {proc.returncode}"])[0][:200]


def make_data(out: Path) -> dict[str, str]:
    """Tiny shapes shards and their precomputed latent shards (text embeddings); the two data.shards values."""
    image, latent = out / "shapes", out / "latents"
    if not (image / "shapes-000003.tar").is_file():
        subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(image), "--num-samples", "256",
                        "--shard-size", "64"], cwd=ROOT, env=env(), check=True, capture_output=True)
    if not (latent / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "data.precompute", "--input", f"{image}/shapes-{{000000..000003}}.tar",
                        "--output", str(latent)], cwd=ROOT, env=env(), check=True, capture_output=True)
    return {"image": f"{image}/shapes-{{000000..000003}}.tar", "latent": f"{latent}/shapes-{{000000..000003}}.tar"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/config_matrix", help="data and run directories")
    ap.add_argument("--only", nargs="*", default=[], help="run the cells whose name contains every word")
    ap.add_argument("--out", help="JSON file of {cell: verdict}")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    shards = make_data(work / "data")
    results = {}
    for cell in cells():
        if not all(w in cell.name for w in args.only):
            continue
        start = time.perf_counter()
        why = refusal(cell, shards)
        results[cell.name] = (f"refused: {why}" if why is not None
                              else verdict(train(cell, shards, work / "runs" / cell.name.replace("/", "-"))))
        print(f"{cell.name:<42} {results[cell.name][:110]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
