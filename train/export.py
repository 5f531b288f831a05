"""Export a checkpoint as unsharded safetensors (model.safetensors + config.json, the default) or as a
diffusers pipeline folder; EMA weights by default.

    python -m train.export --checkpoint runs/cpu-small/checkpoints --out export/
    python -m train.export --checkpoint runs/cpu-small/checkpoints/step_00000200 --out export-raw/ --weights raw
    python -m train.export --checkpoint runs/cpu-small/checkpoints --format diffusers --out export-diffusers/

`--checkpoint` and `--weights` as in train.sample (which loads the safetensors export with `--checkpoint
export/`); the safetensors metadata records which weights the export holds. `--format diffusers` writes
a folder that stock diffusers loads with `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`
(docs/diffusers.md): the transformer, the run's text encoder and tokenizer, its VAE (none for the pixel
VAE), the flow-matching Euler scheduler with `--shift`, the code files generated from this repository
(pipeline_ecdit.py, transformer/modeling_ecdit.py), model_index.json with the export version and a model
card (README.md; `--eval` adds the scores of a train.evaluate eval.json).
"""

from __future__ import annotations

import argparse
import json
import re
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
    p.add_argument("--eval", default=None,
                   help="--format diffusers: a train.evaluate eval.json whose scores the model card lists")
    add_encoder_args(p)
    return p


def export_diffusers(model, dcfg, out_dir: str | Path, weights: str = "raw", shift: float = 1.0,
                     card: dict | None = None):
    """Write `model` (a DiT) with the encoders of DataConfig `dcfg` as an ECDiTPipeline folder with its
    code files and a model card (`card`: see `model_card`); returns the pipeline (sharing the model's
    parameters)."""
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
    (Path(out_dir) / "README.md").write_text(model_card(model, dcfg, weights, shift, **(card or {})))
    return pipe


def model_card(model, dcfg, weights: str, shift: float, source: str = "", step: int | None = None,
               run_cfg: dict | None = None, scores: dict | None = None) -> str:
    """The export folder's README.md for DiT `model`: what it is, how it was trained, how to load it."""
    from model.dit import count_params

    cfg = model.cfg
    run_cfg = run_cfg or {}
    train, data = run_cfg.get("train") or {}, run_cfg.get("data") or {}
    moe = cfg.moe
    if moe is None:
        routing = "dense (no MoE layers)"
    else:
        cap = (f"top-{moe.top_k}, capacity factor {moe.tc_capacity_factor}" if moe.router == "token_choice"
               else f"capacity factor {moe.capacity_factor}")
        routing = (f"{moe.router} router, {moe.num_experts} experts, {cap}, MoE FFN every {cfg.moe_every} blocks "
                   f"(training groups: {moe.group}); the pipeline's `routing=`: 'sample' (default: capacity per "
                   f"image), 'dynamic' (the exported thresholds), 'tokens' (groups of {moe.inference_group_size}), "
                   f"'batch'")
    rows = [("architecture", f"EC-DiT (DiT with {'MoE' if moe else 'dense'} FFNs): depth {cfg.depth}, width "
                             f"{cfg.dim}, {cfg.heads} heads ({cfg.kv_heads} kv), patch {cfg.patch_size}, "
                             f"latents {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, "
                             f"{count_params(model) / 1e6:.2f}M parameters"),
            ("preset", cfg.name), ("routing", routing), ("weights", weights),
            ("training steps", f"{step if step is not None else 'unknown'}"
                               + (f" (of {train['steps']} planned)" if train.get("steps") else "")),
            ("data", ", ".join(f"{k} {data[k]}" for k in ("shards", "image_size") if data.get(k)) or "unknown"),
            ("text encoder", f"{dcfg.text_encoder} {dcfg.text_encoder_path or ''}".strip()
                             + f", {dcfg.max_text_len} tokens"),
            ("VAE", f"{dcfg.vae} {dcfg.vae_path or ''}".strip()), ("scheduler shift", f"{shift}"),
            ("source", source or "unknown")]
    if scores:
        keep = {k: scores[k] for k in ("overall", "per_category", "fid", "n") if k in scores}
        rows.append(("scores (train.evaluate)", json.dumps(keep)))
    else:
        rows.append(("scores", "not measured at export"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [ec-dit, mixture-of-experts, diffusion-transformer]
---

# EC-DiT {cfg.name}

| | |
|---|---|
{table}

## Load

Needs torch, diffusers, transformers and safetensors; the folder's code files (`pipeline_ecdit.py`,
`transformer/modeling_ecdit.py`, generated from the EC-DiT repository) are run, hence `trust_remote_code`.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
# on a GPU: torch_dtype=torch.bfloat16 (the routers stay fp32), then pipe.to("cuda")
image = pipe("a red circle", num_inference_steps=20, guidance_scale=4.0, seed=0).images[0]
```

Options: `routing=` ("sample", "dynamic", "tokens", "batch"), `dynamic_multiplier=`, `shift=`, `batch_size=`,
`output_type=` ("pil", "np", "pt", "latent"). With the same prompt, seed, steps, guidance, shift and routing
the image is the one `python -m train.sample` draws from the checkpoint.
"""


def _run(args: argparse.Namespace) -> int:
    model, run_cfg, folder, weights = load_model(args.checkpoint, "cpu", args.weights)
    if args.format == "safetensors":
        path = export_safetensors(model, args.out, weights=weights)
    else:
        dcfg = data_config(run_cfg, model.cfg, text_encoder=args.text_encoder,
                           text_encoder_path=args.text_encoder_path, max_text_len=args.max_text_len,
                           vae=args.vae, vae_path=args.vae_path)
        m = re.fullmatch(r"step_(\d+)", folder.name)
        scores = json.loads(Path(args.eval).read_text()) if args.eval else None
        export_diffusers(model, dcfg, args.out, weights, args.shift,
                         card={"source": str(folder), "step": int(m.group(1)) if m else None, "run_cfg": run_cfg,
                               "scores": scores})
        path = Path(args.out) / "model_index.json"
    print(f"[export] {weights} weights of {folder} -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
