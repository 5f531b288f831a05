"""Export a checkpoint as unsharded safetensors (model.safetensors + config.json), EMA weights by default.

    python -m train.export --checkpoint runs/cpu-small/checkpoints --out export/
    python -m train.export --checkpoint runs/cpu-small/checkpoints/step_00000200 --out export-raw/ --weights raw

`--checkpoint` and `--weights` as in train.sample (which loads the export with `--checkpoint export/`);
the safetensors metadata records which weights the export holds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from train.checkpoint import export_safetensors
from train.cli import OneLineParser, add_checkpoint_args, run_cli
from train.inference_model import load_model


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.export", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output folder")
    return p


def _run(args: argparse.Namespace) -> int:
    model, _, folder, weights = load_model(args.checkpoint, "cpu", args.weights)
    path = export_safetensors(model, args.out, weights=weights)
    print(f"[export] {weights} weights of {folder} -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
