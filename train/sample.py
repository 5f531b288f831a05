"""Generate images from a trained EC-DiT: classifier-free guidance + Euler steps of the rectified flow.

    python -m train.sample --checkpoint runs/x/checkpoints --prompts "a red circle" "two blue squares"
    python -m train.sample --checkpoint export/ --prompt-file prompts.txt --steps 30 --guidance 4 --out samples/

The sampling command line. `--checkpoint` is a `step_*` directory written by train/checkpoint.py, a run's
checkpoint root (its latest complete step is used), or a safetensors export folder (model.safetensors +
config.json); `--weights ema|raw` (default ema) picks the weights (train/inference_model.py load_model).
Writes `000_<slug>.png` per prompt (native resolution), `grid.png` (captioned, upscaled) and
`samples.json` (with the weights used); `--heatmap` adds `experts.png` (per image and MoE layer, how many
experts processed each token: the paper's Fig. 6).

The noise of prompt i is seeded with (--seed, i); with the default `--routing sample` an image does not
depend on the batch size or on the other prompts (train/generate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from model.config import DiTConfig
from model.flops import sample_flops_per_image
from model.routing import LoadMeter
from train.cli import (OneLineParser, add_encoder_args, add_generation_args, check_generation_args, check_positive,
                       parse_device, read_prompts, run_cli, slug)
from train.generate import SampleError, decode, generate_latents, routing_maps
from train.inference_model import DATA_KEYS, check_compatible, data_config, load_model
from train.visualize import expert_heatmap_layers, image_grid, moe_layer_names, save_png


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.sample", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generation_args(p)
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to sample")
    p.add_argument("--prompt-file", default=None, help="text file with one prompt per line")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--nrow", type=int, default=8, help="images per row of grid.png")
    p.add_argument("--heatmap", action="store_true",
                   help="also write experts.png: experts per token of each MoE layer (Fig. 6), routed per sample")
    p.add_argument("--heatmap-t", type=float, default=0.5, help="noise level t of the heatmap forward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (one graph per block; not with --routing dynamic)")
    add_encoder_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


def _check_args(args: argparse.Namespace) -> None:
    check_generation_args(args)
    check_positive(args, "nrow")
    if not 0.0 <= args.heatmap_t <= 1.0:
        raise SampleError(f"--heatmap-t={args.heatmap_t} must be in [0, 1]")
    if args.compile and args.routing == "dynamic":
        raise SampleError("--compile needs a fixed routing group: --routing dynamic sizes each expert's "
                          "work from the data (a host sync); drop --compile or pick another --routing")


def _heatmap(model, text_encoder, prompts: list[str], latents_NCHW: torch.Tensor, images_NCHW: torch.Tensor,
             args: argparse.Namespace):
    """experts.png: per image and MoE layer, the experts that processed each token (routed per sample)."""
    cfg: DiTConfig = model.cfg
    counts = []
    for s in range(0, len(prompts), args.batch_size):
        counts.append(routing_maps(model, text_encoder, prompts[s:s + args.batch_size],
                                   latents_NCHW[s:s + args.batch_size], args.heatmap_t, args.seed, "sample"))
    per_layer = [torch.cat([c[li] for c in counts]) for li in range(len(counts[0]))]
    return expert_heatmap_layers(per_layer, len(prompts), cfg.grid, cfg.moe.num_experts, images_NCHW,
                                 layer_names=moe_layer_names(len(per_layer), cfg.moe_every))


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    prompts = read_prompts(args.prompts, args.prompt_file)
    device = parse_device(args.device)

    t0 = time.perf_counter()
    model, run_cfg, folder, weights = load_model(args.checkpoint, device, args.weights)
    cfg: DiTConfig = model.cfg
    if args.compile:
        from parallel.compile import compile_blocks
        compile_blocks(model)
    print(f"[sample] model {cfg.name} from {folder}, {weights} weights ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, {cfg.num_moe_blocks} MoE layers) in {time.perf_counter() - t0:.1f}s")
    dcfg = data_config(run_cfg, cfg, text_encoder=args.text_encoder, text_encoder_path=args.text_encoder_path,
                       max_text_len=args.max_text_len, vae=args.vae, vae_path=args.vae_path)
    from data.encoders import load_text_encoder, load_vae

    text_encoder, vae = load_text_encoder(dcfg, device), load_vae(dcfg, device)
    check_compatible(cfg, text_encoder, vae, dcfg)
    print(f"[sample] {len(prompts)} prompts, text encoder {dcfg.text_encoder}, vae {dcfg.vae}, {args.steps} steps, "
          f"guidance {args.guidance}, routing {args.routing}, seed {args.seed}")

    meter = LoadMeter(cfg.num_moe_blocks)
    latents = generate_latents(model, text_encoder, prompts, args.steps, args.guidance, args.seed,
                               args.batch_size, args.routing, args.group_size, args.shift, log=print,
                               multiplier=args.dynamic_multiplier, meter=meter)
    load = meter.summary()
    images = decode(vae, latents, args.batch_size)  # [N, 3, H, W]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        name = f"{i:03d}_{slug(prompt)}.png"
        save_png(image_grid(img[None], nrow=1, pad=0, scale=1), out / name)
        records.append({"index": i, "prompt": prompt, "file": name, "seed": args.seed})
    save_png(image_grid(images, nrow=args.nrow, captions=prompts), out / "grid.png")
    files = [out / "grid.png"]
    if args.heatmap and cfg.moe is not None:
        files.append(save_png(_heatmap(model, text_encoder, prompts, latents, images, args), out / "experts.png"))
    meta = {"checkpoint": str(folder), "weights": weights, "model": cfg.name, "steps": args.steps, "guidance": args.guidance,
            "shift": args.shift, "seed": args.seed, "routing": args.routing, "group_size": args.group_size,
            "dynamic_multiplier": args.dynamic_multiplier, "experts_per_token": load.get("experts_per_token"),
            # per image and Euler step (cond + uncond): with the expert slots computed, and the useful ones
            "flops_per_image_step": sample_flops_per_image(cfg, args.routing, load.get("slots_run_per_token")),
            "useful_flops_per_image_step": sample_flops_per_image(cfg, args.routing, load.get("experts_per_token")),
            "data": {k: getattr(dcfg, k) for k in DATA_KEYS}, "samples": records}
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    files.append(out / "samples.json")
    print(f"[sample] wrote {len(records)} images to {out}/ ({', '.join(f.name for f in files)}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
