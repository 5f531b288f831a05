"""Routing study: dense / expert choice / token choice top-2 / DiffMoE at equal activated compute and equal
steps on the embedded shapes dataset (the EC-DiT paper's Table 4 and Fig. 4-6, plus DiffMoE).

    python bench/study.py                          # the CPU study: 4 x 1500 steps, ~45 min on 2 cores
    python bench/study.py --steps 20 --prompts 8   # smoke run
    python bench/study.py --skip-train             # re-evaluate finished runs

Phases: (1) the shapes data under <out>/shapes (generated if missing; held-out compositions excluded);
(2) one training run per variant through the Hydra trainer (`python -m train experiment=study_cpu
model=study-<variant>`; a finished run is resumed, i.e. skipped); (3) evaluation of each final
checkpoint (its EMA weights with --weights ema, the default; raw, with a note, for the study_cpu runs,
which train without EMA) in every inference mode - group (the paper: G tokens across the batch),
per_sample (capacity per image) and dynamic (per-expert thresholds; batch-independent): validation loss
on fixed data, noise and timesteps; the shapes scorer (per category) on fixed held-out and in-distribution prompts and seeds;
expert slots, FLOPs and wall time per image. Writes study.md, study.json and the plots loss.png,
load.png, heatmap.png and samples.png to <out>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_json  # noqa: E402
from data import load_text_encoder, load_vae  # noqa: E402
from data.synthetic import caption_of, generate_sample, heldout_prompts, training_prompts, write_shards  # noqa: E402
from model.flops import sample_flops_per_image  # noqa: E402
from model.flow import interpolate  # noqa: E402
from model.routing import LoadMeter  # noqa: E402
from train.evaluate import score_images  # noqa: E402
from train.generate import decode, generate_latents, inference_routing, routing_maps  # noqa: E402
from train.inference_model import WEIGHTS, data_config, load_model  # noqa: E402
from train.visualize import expert_heatmap_layers, image_grid, moe_layer_names, save_png  # noqa: E402

VARIANTS = ("dense", "ec", "tc", "diffmoe")
LABELS = {"dense": "dense (equal compute)", "ec": "expert choice f_c=2", "tc": "token choice top-2",
          "diffmoe": "DiffMoE (batch pool)"}
MODES = {"group": "tokens", "per_sample": "sample", "dynamic": "dynamic"}  # study name -> sampler routing
VAL_INDEX0 = 10_000_000  # validation images: shapes samples far beyond any training shard


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# ---- phases 1-2: data and training ----------------------------------------------------------------

def ensure_data(out: Path, num_samples: int, shard_size: int) -> str:
    pattern = write_shards(str(out / "shapes"), num_samples, shard_size, progress=False)
    return pattern


def train_variant(variant: str, args, shards: str) -> Path:
    run_dir = args.out / f"study-{variant}"
    cmd = [sys.executable, "-m", "train", f"experiment={args.experiment}", f"model=study-{variant}",
           f"train.name=study-{variant}", f"train.run_dir={run_dir}", f"train.steps={args.steps}",
           f'data.shards="{shards}"', f"train.wandb_mode={args.wandb_mode}", *args.overrides]
    log(f"training {variant}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    with open(args.out / f"train-{variant}.log", "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    if rc != 0:
        raise SystemExit(f"training {variant} failed (exit {rc}); see {args.out / f'train-{variant}.log'}")
    log(f"trained {variant} in {time.perf_counter() - t0:.0f}s")
    return run_dir


def read_losses(run_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(steps, losses, last logged record) of a run's metrics.jsonl (the latest record of each step)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    steps = np.array(sorted(rows))
    return steps, np.array([rows[s]["loss"] for s in steps]), rows[steps[-1]]


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first values average what exists)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def steps_to_reach(steps: np.ndarray, losses: np.ndarray, target: float, window: int) -> int | None:
    hit = np.nonzero(smooth(losses, window) <= target)[0]
    return int(steps[hit[0]]) if len(hit) else None


# ---- phase 3: evaluation --------------------------------------------------------------------------

def validation_batches(text_encoder, vae, n: int, batch: int, seed: int):
    """Fixed validation data: shapes samples, their captions, noise and stratified timesteps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        idx = range(VAL_INDEX0 + s, VAL_INDEX0 + min(n, s + batch))
        samples = [generate_sample(i) for i in idx]
        img = torch.from_numpy(np.stack([im for im, _, _ in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
        emb, mask = text_encoder([c for _, c, _ in samples])
        x0 = vae.encode(img)
        t = (torch.arange(len(samples)) + torch.rand(len(samples), generator=g)) / len(samples)
        out.append((x0, emb, mask, t.clamp(0.02, 0.98), torch.randn(x0.shape, generator=g)))
    return out


@torch.no_grad()
def validation_loss(model, batches, routing: str) -> float:
    """Mean squared velocity error on all tokens (no masking, no text dropout), fixed t and noise."""
    total, n = 0.0, 0
    with inference_routing(model, routing) as net:
        for x0, emb, mask, t, noise in batches:
            x_t = interpolate(x0, noise, t)
            pred = net(x_t, t, emb, mask, collect_stats=False).pred
            total += float((pred - (noise - x0)).pow(2).mean()) * len(t)
            n += len(t)
    return total / n


def score(images: torch.Tensor, prompts: list[dict]) -> dict:
    """The scorer's summary (overall, per category); the per-image reasons stay out of study.json."""
    summary = score_images(images, prompts)
    summary.pop("results")
    return summary


def evaluate_variant(variant: str, run_dir: Path, args, prompt_sets: dict) -> dict:
    model, run_cfg, folder, weights = load_model(run_dir / "checkpoints", weights=args.weights, log=log)
    cfg = model.cfg
    dcfg = data_config(run_cfg, cfg)
    text_encoder, vae = load_text_encoder(dcfg), load_vae(dcfg)
    val = validation_batches(text_encoder, vae, args.val_images, 32, seed=1)
    modes = MODES if cfg.moe is not None else {"per_sample": "sample"}  # dense: one mode
    result = {"checkpoint": str(folder), "weights": weights, "model": cfg.name, "modes": {}, "cfg": cfg}
    captions = {k: [caption_of(p) for p in v] for k, v in prompt_sets.items()}
    all_captions = captions["heldout"] + captions["train"]
    for name, routing in modes.items():
        r = {"val_loss": validation_loss(model, val, routing)}
        t0 = time.perf_counter()
        meter = LoadMeter(cfg.num_moe_blocks)
        latents = generate_latents(model, text_encoder, all_captions, args.sample_steps, args.guidance,
                                   args.seed, args.batch_size, routing, meter=meter)
        load = meter.summary()
        seconds = time.perf_counter() - t0
        images = decode(vae, latents)
        nh = len(captions["heldout"])
        r["scorer_heldout"] = score(images[:nh], prompt_sets["heldout"])
        r["scorer_train"] = score(images[nh:], prompt_sets["train"])
        r["ms_per_image"] = 1000 * seconds / len(all_captions)
        ept = load.get("experts_per_token") if cfg.moe is not None else None
        run = load.get("slots_run_per_token") if cfg.moe is not None else None
        r["experts_per_token"] = ept
        r["gflops_per_image"] = args.sample_steps * sample_flops_per_image(cfg, routing, run) / 1e9
        r["useful_gflops_per_image"] = args.sample_steps * sample_flops_per_image(cfg, routing, ept) / 1e9
        if cfg.moe is not None:  # Fig. 6: how many experts processed each token, first prompts, t = 0.5
            k = min(4, nh)
            r["expert_count"] = [c.tolist() for c in routing_maps(model, text_encoder, all_captions[:k],
                                                                   latents[:k], 0.5, args.seed, routing)]
        result["modes"][name] = r
        result.setdefault("images", {})[name] = images
        log(f"{variant:8s} {name:10s} val {r['val_loss']:.4f} scorer heldout {r['scorer_heldout']['overall']:.3f} "
            f"train {r['scorer_train']['overall']:.3f} {r['ms_per_image']:.1f} ms/img "
            f"{r['gflops_per_image']:.2f} GFLOPs/img")
    return result


# ---- outputs --------------------------------------------------------------------------------------

def plot_losses(curves: dict, path: Path, window: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, (steps, losses) in curves.items():
        ax.plot(steps, smooth(losses, window), label=LABELS[v])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {window} logs)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_load(train_load: dict, counts: dict, num_experts: int, path: Path) -> None:
    """Top: per-expert share of the slots in training (last logged step, mean over MoE layers). Bottom:
    histogram of experts per token in each inference mode (all MoE layers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(train_load)
    fig, axes = plt.subplots(2, len(variants), figsize=(4 * len(variants), 6.5), squeeze=False)
    for j, v in enumerate(variants):
        ax = axes[0, j]
        ax.bar(range(num_experts), train_load[v])
        ax.axhline(1 / num_experts, color="k", lw=0.8, ls="--")
        ax.set_title(f"{LABELS[v]}: training load", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of expert slots")
        ax = axes[1, j]
        for mode, layer_counts in counts[v].items():
            c = np.concatenate([np.asarray(x) for x in layer_counts])
            ax.hist(c, bins=np.arange(num_experts + 2) - 0.5, alpha=0.5, density=True, label=mode)
        ax.set_title(f"{LABELS[v]}: experts per token (inference)", fontsize=9)
        ax.set_xlabel("experts that processed the token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(path: Path, table: dict, args) -> None:
    lines = [f"# Routing study ({args.steps} steps, batch {args.batch_size_train}, shapes data)", "",
             "## Training", "",
             "| model | final train loss | steps to dense final loss | val loss (group) |",
             "|---|---|---|---|"]
    for v, r in table.items():
        val = r["modes"].get("group", r["modes"].get("per_sample"))["val_loss"]
        lines.append(f"| {LABELS[v]} | {fmt(r['final_loss'])} | {fmt(r['steps_to_dense'], 'd')} | {fmt(val)} |")
    lines += ["", "## Inference modes", "",
              f"Scorer: fraction of images that match their prompt ({args.prompts} held-out-composition prompts, "
              f"{args.prompts} in-distribution prompts, seed {args.seed}, {args.sample_steps} Euler steps, "
              f"CFG {args.guidance}). GFLOPs per image for all steps (conditional + unconditional); "
              "`useful` counts only the expert slots that hold a token.", "",
              "| model | mode | val loss | scorer held-out | scorer in-dist | experts/token | GFLOPs/img | useful | ms/img |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v, r in table.items():
        for mode, m in r["modes"].items():
            ept = m["experts_per_token"]
            lines.append(f"| {LABELS[v]} | {mode} | {m['val_loss']:.4f} | {m['scorer_heldout']['overall']:.3f} | "
                         f"{m['scorer_train']['overall']:.3f} | {fmt(np.mean(ept) if ept else None, '.2f')} | "
                         f"{m['gflops_per_image']:.2f} | {m['useful_gflops_per_image']:.2f} | {m['ms_per_image']:.1f} |")
    cats = sorted({c for r in table.values() for m in r["modes"].values() for c in m["scorer_train"]["per_category"]})
    lines += ["", "## Scorer per category (in-distribution prompts / held-out prompts, per_sample mode)", "",
              "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for v, r in table.items():
        m = r["modes"]["per_sample"]
        cells = [f"{m['scorer_train']['per_category'].get(c, float('nan')):.2f} / "
                 f"{m['scorer_heldout']['per_category'].get(c, float('nan')):.2f}" for c in cats]
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: loss.png, load.png, heatmap.png, samples.png", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="runs, data and results folder")
    p.add_argument("--experiment", default="study_cpu", help="Hydra experiment config (conf/experiment/)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=1500, help="training steps of every variant")
    p.add_argument("--data-samples", type=int, default=20000, help="shapes training images")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--prompts", type=int, default=48, help="scorer prompts per set (held-out and in-distribution)")
    p.add_argument("--val-images", type=int, default=256, help="validation images for the validation loss")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=WEIGHTS, default="ema",
                   help="evaluate the EMA of the parameters (raw, with a note, for runs without one) or the raw ones")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window (logged steps) of the loss curves")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing runs only")
    p.add_argument("--wandb-mode", default="disabled", choices=("offline", "online", "disabled"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run (e.g. data.batch_size=8)")
    args = p.parse_args(argv)
    if args.variants[0] != "dense" and "dense" in args.variants:
        args.variants = ["dense"] + [v for v in args.variants if v != "dense"]
    for name in ("steps", "data_samples", "prompts", "val_images", "sample_steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.batch_size_train = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("data.batch_size=")), 16)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)

    shards = ensure_data(args.out, args.data_samples, args.shard_size)
    runs = {v: args.out / f"study-{v}" for v in args.variants}
    if not args.skip_train:
        for v in args.variants:
            train_variant(v, args, shards)
    curves, last = {}, {}
    for v, run_dir in runs.items():
        steps, losses, rec = read_losses(run_dir)
        curves[v], last[v] = (steps, losses), rec
    prompt_sets = {"heldout": heldout_prompts(args.prompts, args.seed), "train": training_prompts(args.prompts, args.seed)}
    results = {}
    for v, run_dir in runs.items():
        results[v] = evaluate_variant(v, run_dir, args, prompt_sets)

    # Steps to reach the dense model's final (smoothed) training loss.
    final = {v: float(smooth(losses, args.smooth)[-1]) for v, (_, losses) in curves.items()}
    for v, r in results.items():
        r["final_loss"] = final[v]
        r["steps_to_dense"] = (steps_to_reach(*curves[v], final["dense"], args.smooth) if "dense" in final else None)
    plot_losses(curves, args.out / "loss.png", args.smooth)
    moe = [v for v in results if results[v]["modes"].get("group")]
    num_experts = None
    if moe:
        model_cfg = results[moe[0]]["cfg"]
        num_experts = model_cfg.moe.num_experts
        train_load = {}
        for v in moe:
            layers = sorted({k.split("/")[1] for k in last[v] if k.startswith("moe/") and "/load/" in k})
            train_load[v] = [float(np.mean([last[v][f"moe/{layer}/load/e{e}"] for layer in layers]))
                             for e in range(num_experts)]
        counts = {v: {m: results[v]["modes"][m]["expert_count"] for m in results[v]["modes"]} for v in moe}
        plot_load(train_load, counts, num_experts, args.out / "load.png")
        k = len(next(iter(counts[moe[0]].values()))[0]) // model_cfg.num_tokens
        heat_rows = []
        for v in moe:  # Fig. 6: per variant and mode, experts per token for the first prompts
            for m in ("group", "dynamic"):
                maps = [torch.tensor(c) for c in results[v]["modes"][m]["expert_count"]]
                img = expert_heatmap_layers(maps, batch=k, grid=model_cfg.grid, num_experts=num_experts,
                                            images=results[v]["images"][m][:k],
                                            layer_names=moe_layer_names(len(maps), model_cfg.moe_every))
                heat_rows.append((f"{LABELS[v]} / {m}", img))
        save_png(_stack_captioned(heat_rows), args.out / "heatmap.png")
    n_show = min(8, args.prompts)
    grid_images = torch.cat([results[v]["images"]["per_sample"][:n_show] for v in results])
    captions = [f"{v}: {caption_of(pr)}" for v in results for pr in prompt_sets["heldout"][:n_show]]
    save_png(image_grid(grid_images, nrow=n_show, captions=captions), args.out / "samples.png")

    for r in results.values():
        r.pop("images", None)
        r.pop("cfg", None)
        for m in r["modes"].values():
            m.pop("expert_count", None)
    write_markdown(args.out / "study.md", results, args)
    write_json(args.out / "study.json", {"environment": environment("cpu"), "steps": args.steps,
                                         "results": results, "heldout_prompts": prompt_sets["heldout"],
                                         "train_prompts": prompt_sets["train"]})
    print((args.out / "study.md").read_text())
    return 0


def _stack_captioned(rows):
    """Stack (caption, PIL image) rows vertically with the caption above each."""
    from PIL import Image, ImageDraw
    width = max(img.width for _, img in rows)
    height = sum(img.height + 14 for _, img in rows)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for caption, img in rows:
        ImageDraw.Draw(canvas).text((2, y), caption, fill="black")
        canvas.paste(img, (0, y + 14))
        y += img.height + 14
    return canvas


if __name__ == "__main__":
    sys.exit(main())
