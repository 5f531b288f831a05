"""The command-line pieces that the sampler, evaluator and export share: the one-line-error parser, the
checkpoint / generation / encoder options and their checks, prompt reading, and `run_cli`, which turns
bad input into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from model.config import INFERENCE_MODES, ConfigError
from train.generate import SampleError
from train.inference_model import WEIGHTS


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --weights (sampler, evaluator, export)."""
    p.add_argument("--checkpoint", required=True,
                   help="a step_* checkpoint dir, a run's checkpoint root (latest step), or a safetensors export folder")
    p.add_argument("--weights", choices=WEIGHTS, default="ema",
                   help="the EMA of the parameters or the raw ones; ema falls back to raw, with a note, when the "
                        "checkpoint has no EMA")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the sampler and the evaluator: checkpoint, Euler/CFG settings, MoE routing."""
    add_checkpoint_args(p)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule (>1: more steps at high noise)")
    p.add_argument("--seed", type=int, default=0, help="noise of image i is seeded with (seed, i)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (x2 with CFG)")
    p.add_argument("--routing", choices=INFERENCE_MODES, default="sample",
                   help="MoE inference routing: sample = capacity per image, dynamic = per-expert thresholds "
                        "(both batch-independent), tokens = groups of --group-size tokens across the batch")
    p.add_argument("--dynamic-multiplier", type=float, default=None,
                   help="--routing dynamic: threshold multiplier (>1 fewer tokens per expert, <1 more; "
                        "default the model's, 1.0)")
    p.add_argument("--group-size", type=int, default=None,
                   help="tokens per routing group with --routing tokens (default: the model's inference_group_size)")
    p.add_argument("--device", default="cpu")


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (default: the run's config.json 'data', else the DataConfig defaults)")
    g.add_argument("--text-encoder", choices=("minilm", "t5"), default=None)
    g.add_argument("--text-encoder-path", default=None)
    g.add_argument("--max-text-len", type=int, default=None)
    g.add_argument("--vae", choices=("pixel", "kl"), default=None)
    g.add_argument("--vae-path", default=None)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each integer option `names` (attribute names) must be >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def check_generation_args(args: argparse.Namespace) -> None:
    if args.group_size is not None and args.routing != "tokens":
        raise SampleError(f"--group-size is only used with --routing tokens (got --routing {args.routing})")
    if args.dynamic_multiplier is not None and (args.routing != "dynamic" or args.dynamic_multiplier <= 0):
        raise SampleError(f"--dynamic-multiplier={args.dynamic_multiplier} needs --routing dynamic and a value > 0")
    check_positive(args, "steps", "batch_size")


def parse_device(name: str) -> torch.device:
    """--device as a torch device that this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: CUDA is not available on this machine")
    return device


def slug(text: str, max_len: int = 40) -> str:
    """File-name-safe lowercase slug of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "prompt"


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """--prompts plus the lines of --prompt-file (blank ones skipped); at least one."""
    out = [p for p in (prompts or []) if p.strip()]
    if prompt_file is not None:
        f = Path(prompt_file)
        if not f.is_file():
            raise SampleError(f"--prompt-file {f} does not exist")
        lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
        if not lines:
            raise SampleError(f"--prompt-file {f} has no prompts (one per line)")
        out += lines
    if not out:
        raise SampleError("no prompts: pass --prompts \"a red circle\" ... or --prompt-file FILE")
    return out


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None) -> int:
    """Parse and run; bad input (SampleError, ConfigError, a missing file) is one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (SampleError, ConfigError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
