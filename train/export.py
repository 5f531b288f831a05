"""Export a checkpoint as unsharded safetensors (model.safetensors + config.json, the default) or as a
diffusers pipeline folder; EMA weights by default.

    python -m train.export --checkpoint runs/cpu-small/checkpoints --out export/
    python -m train.export --checkpoint runs/cpu-small/checkpoints/step_00000200 --out export-raw/ --weights raw
    python -m train.export --checkpoint runs/cpu-small/checkpoints --format diffusers --out export-diffusers/

`--checkpoint` and `--weights` as in train.sample (which loads the safetensors export with `--checkpoint
export/`); the safetensors metadata records which weights the export holds. `--format diffusers` writes
what `train.diffusers_pipeline.ECDiTPipeline.from_pretrained(out)` loads (docs/diffusers.md): the
transformer, the run's text encoder and tokenizer, its VAE (none for the pixel VAE), the flow-matching
Euler scheduler with `--shift` and model_index.json with the export version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from train.weights import export_safetensors
from train.cli import OneLineParser, add_checkpoint_args, add_encoder_args, run_cli
from train.inference_model import check_compatible, data_config, load_model

FORMATS = ("safetensors", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.export", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors: model.safetensors + config.json (train.sample reads it); diffusers: a "
                        "pipeline folder for diffusers")
    p.add_argument("--shift", type=float, default=1.0,
                   help="--format diffusers: the scheduler's default time shift (train.sample's --shift)")
    add_encoder_args(p)
    return p


def export_diffusers(model, dcfg, out_dir: str | Path, weights: str = "raw", shift: float = 1.0):
    """Write `model` (a DiT) with the encoders of DataConfig `dcfg` as an ECDiTPipeline folder; returns
    the pipeline (sharing the model's parameters)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from data.encoders import load_text_encoder, load_vae
    from train.diffusers_pipeline import EXPORT_VERSION, ECDiTPipeline, ECDiTTransformer2DModel

    text_encoder, vae = load_text_encoder(dcfg, "cpu"), load_vae(dcfg, "cpu")
    check_compatible(model.cfg, text_encoder, vae, dcfg)
    pipe = ECDiTPipeline(transformer=ECDiTTransformer2DModel.from_dit(model, weights),
                         scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                         text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer,
                         vae=getattr(vae, "model", None), max_text_len=dcfg.max_text_len,
                         export_version=EXPORT_VERSION)
    pipe.save_pretrained(out_dir)
    return pipe


def _run(args: argparse.Namespace) -> int:
    model, run_cfg, folder, weights = load_model(args.checkpoint, "cpu", args.weights)
    if args.format == "safetensors":
        path = export_safetensors(model, args.out, weights=weights)
    else:
        dcfg = data_config(run_cfg, model.cfg, text_encoder=args.text_encoder,
                           text_encoder_path=args.text_encoder_path, max_text_len=args.max_text_len,
                           vae=args.vae, vae_path=args.vae_path)
        export_diffusers(model, dcfg, args.out, weights, args.shift)
        path = Path(args.out) / "model_index.json"
    print(f"[export] {weights} weights of {folder} -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
