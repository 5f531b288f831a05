"""Routing study: dense / expert choice / token choice top-2 / DiffMoE at equal activated compute and equal
steps, over several training seeds, on the study mix of the shapes set (the EC-DiT paper's Table 4 and
Fig. 4-6, plus DiffMoE).

    python bench/study.py                              # 4 variants x seeds 0 1 x 900 steps, ~75 min on 2 cores
    python bench/study.py --variants ec --seeds 1      # train (or resume) and evaluate one run; report all
    python bench/study.py --skip-train                 # evaluate the finished runs and report
    python bench/study.py --out runs/study-smoke --steps 20 --prompts 8   # smoke run
    python bench/study.py --preset paper-claims [...]  # the paper's claims (bench/paper_claims.py; first argument)

Phases: (1) the shapes data of the study mix (data.synthetic.MIXES["study"]: 16x16 images of one object
or a count of one kind, objects of 5-7 px; held-out compositions excluded) under <out>/shapes-study,
generated if missing; (2) one training run per (variant, seed) in
<out>/study-<variant>-s<seed> through the Hydra trainer (`python -m train experiment=study_cpu
model=study-<variant> train.seed=<seed> data.seed=<seed>`): a run whose latest checkpoint is at --steps is
not retrained, an interrupted one resumes; (3) evaluation of each final checkpoint (--weights ema, the
default: study_cpu trains with an EMA of 0.99) in every inference mode - group (the paper: G tokens across
the batch), per_sample (capacity per image) and dynamic (per-expert thresholds; batch-independent):
validation loss on fixed images, noise and timesteps; strict and per-attribute scores (data/scorer.py) on
fixed held-out and in-distribution prompts; expert slots, FLOPs and wall time per image; experts per token
against the denoising time t (Fig. 6b). It is cached in the run's eval.json and reused while the checkpoint
step and the evaluation settings stay the same (--reevaluate redoes it); (4) the report from every cached
eval.json in <out> at --steps, whichever invocation wrote it: per variant the mean and the min-max spread
over seeds (study.md, study.json), the differences whose min-max intervals do not overlap, and the plots
loss.png, load.png, heatmap.png, samples.png and experts_vs_t.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_json  # noqa: E402
from data import load_text_encoder, load_vae  # noqa: E402
from data.synthetic import (LATER_SETTINGS, MIXES, caption_of, generate_sample, heldout_prompts,  # noqa: E402
                            read_mix, training_prompts, write_shards)
from model import extras  # noqa: E402
from model.config import DiTConfig  # noqa: E402
from model.flops import sample_flops_per_image  # noqa: E402
from model.flow import interpolate  # noqa: E402
from model.routing import LoadMeter, routing_groups  # noqa: E402
from train.rundir import complete_checkpoints  # noqa: E402
from train.evaluate import score_images  # noqa: E402
from train.generate import decode, generate_latents, inference_routing, routing_maps  # noqa: E402
from train.inference_model import DATA_KEYS, WEIGHTS, data_config, load_model  # noqa: E402
from train.visualize import expert_heatmap_layers, image_grid, moe_layer_names, save_png  # noqa: E402

VARIANTS = ("dense", "ec", "tc", "diffmoe")
LABELS = {"dense": "dense (equal compute)", "ec": "expert choice f_c=2", "tc": "token choice top-2",
          "diffmoe": "DiffMoE (batch pool)"}
MODES = {"group": "tokens", "per_sample": "sample", "dynamic": "dynamic"}  # study name -> sampler routing
DENSE_MODE = "per_sample"  # the dense model's one mode: it stands for every mode in comparisons
DATA_DIR = "shapes-study"
MIX = MIXES["study"]
VAL_INDEX0 = 10_000_000  # validation images: samples of the mix far beyond any training shard
VAL_BATCH = 32  # validation images per forward
T_VALUES = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # Fig. 6b: denoising times of the sweep
SWEEP_BATCHES = 2  # Fig. 6b: the first validation batches (64 images, 4096 tokens) at every t
SHOW = 8  # held-out prompts per variant in samples.png
HEAT_PROMPTS = 4  # held-out prompts per (variant, mode) in heatmap.png
ATTRIBUTES = ("color", "shape", "count")
SPLITS = {"in": "scorer_train", "heldout": "scorer_heldout"}  # report name -> eval.json key
# Mode figures whose differences between variants claims() checks, and the compute table's (figure, format).
CLAIMED_MODE_FIGURES = {"val_loss": "val loss", "strict_in": "strict in-dist", "strict_heldout": "strict held-out",
                        "partial_in": "partial in-dist", "partial_heldout": "partial held-out"}
COMPUTE_COLUMNS = (("experts_per_token", ".2f"), ("gflops_per_image", ".2f"), ("useful_gflops_per_image", ".2f"),
                   ("ms_per_image", ".1f"))
RUN_NAME = re.compile(r"study-(" + "|".join(VARIANTS) + r")-s(\d+)")
CHANCE = "chance on this mix's in-distribution prompts: 0.02 strict, 0.16 partial (shuffled captions; data/scorer.py)"


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / f"study-{variant}-s{seed}"


# ---- phases 1-2: data and training ----------------------------------------------------------------

def ensure_data(out: Path, num_samples: int, shard_size: int) -> str:
    """The study mix under <out>/shapes-study (complete shards are kept); its shard pattern."""
    return write_shards(str(out / DATA_DIR), num_samples, shard_size, progress=False, **MIX)


def train_overrides(variant: str, seed: int, args, shards: str) -> list[str]:
    """The Hydra overrides of one run's `python -m train`."""
    rd = run_dir(args.out, variant, seed)
    return [f"experiment={args.experiment}", f"model=study-{variant}", f"train.name={rd.name}",
            f"train.run_dir={rd}", f"train.steps={args.steps}", f"train.seed={seed}", f"data.seed={seed}",
            f'data.shards="{shards}"', f"train.wandb_mode={args.wandb_mode}", *args.overrides]


def compose_runs(names, overrides_of, label_of) -> dict[str, tuple]:
    """Per name, (trainer AppConfig, network DiTConfig) of the overrides `overrides_of(name)` as `python -m train`
    composes and validates them; SystemExit starting with `label_of(name, overrides)` when one does not compose."""
    from train.config import compose_app, validate_app

    planned = {}
    for name in names:
        overrides = overrides_of(name)
        try:
            app = compose_app(overrides)
            planned[name] = (app, validate_app(app, 1)[0])
        except Exception as e:  # Hydra's composition errors and ConfigError
            raise SystemExit(f"{label_of(name, overrides)} does not compose: {e}")
    return planned


def planned_models(args, shards: str) -> dict[str, tuple]:
    """Per variant, its composed configs (compose_runs), before any training."""
    return compose_runs(args.variants, lambda v: train_overrides(v, args.seeds[0], args, shards),
                        lambda v, overrides: f"study-{v}: python -m train {' '.join(overrides)}")


def check_batches(models: dict[str, DiTConfig], args) -> None:
    """SystemExit before any training when group mode cannot cut an evaluation batch into its routing groups:
    the validation batches of VAL_BATCH images and the sampling batches of --batch-size prompts (x2: CFG)."""
    for v, cfg in models.items():
        if cfg.moe is None:
            continue
        G, S = cfg.moe.inference_group_size, cfg.num_tokens
        for what, n, per, images_per in (("--val-images", args.val_images, VAL_BATCH, 1),
                                         ("--prompts / --batch-size", 2 * args.prompts, args.batch_size, 2)):
            for b in {min(per, n), n % per or per}:
                try:
                    routing_groups(images_per * b, S, "tokens", G)
                except ValueError:
                    raise SystemExit(f"{what}: a batch of {images_per * b} images x {S} tokens of study-{v} does "
                                     f"not split into group mode's routing groups of {G} tokens; choose them so "
                                     f"that every batch holds a multiple of {G} tokens")


def final_step(rd: Path) -> int | None:
    """Step of a run's latest complete checkpoint (None: none yet)."""
    ckpts = complete_checkpoints(rd / "checkpoints")
    return int(json.loads((ckpts[-1] / "meta.json").read_text())["step"]) if ckpts else None


def train_run(variant: str, seed: int, args, shards: str) -> None:
    """Train one run to --steps, resuming its latest checkpoint; nothing when that is at --steps. The trainer's
    output is appended to <run>/train.log."""
    rd = run_dir(args.out, variant, seed)
    step = final_step(rd)
    if step == args.steps:
        log(f"{rd.name}: trained to step {step}; not retrained")
        return
    if step is not None and step > args.steps:
        raise SystemExit(f"{rd.name} is trained to step {step} > --steps {args.steps}; use --steps {step} or "
                         f"another --out")
    cmd = [sys.executable, "-m", "train", *train_overrides(variant, seed, args, shards)]
    log(f"training {rd.name}" + (f" (resuming step {step})" if step else "") + f": {' '.join(cmd[1:])}")
    rd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(rd / "train.log", "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"training {rd.name} failed (exit {rc}); see {rd / 'train.log'}")
    log(f"trained {rd.name} in {time.perf_counter() - t0:.0f}s")


def read_losses(rd: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(steps, losses, last logged record) of a run's metrics.jsonl (the latest record of each step)."""
    rows = {}
    for line in (rd / "metrics.jsonl").read_text().splitlines():
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

_ENCODERS: dict[tuple, tuple] = {}


def encoders(dcfg) -> tuple:
    """(text encoder, VAE) of a data config, loaded once per encoder setting."""
    key = tuple(getattr(dcfg, k) for k in DATA_KEYS)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_text_encoder(dcfg), load_vae(dcfg)
    return _ENCODERS[key]


def validation_batches(text_encoder, vae, n: int, mix: dict, seed: int) -> list[tuple]:
    """Fixed validation data: samples of the mix, their captions, noise and stratified timesteps, as
    (x0, emb, mask, t, noise) batches of VAL_BATCH images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, VAL_BATCH):
        samples = [generate_sample(i, **mix) for i in range(VAL_INDEX0 + s, VAL_INDEX0 + min(n, s + VAL_BATCH))]
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
            pred = net(interpolate(x0, noise, t), t, emb, mask, collect_stats=False).pred
            total += float((pred - (noise - x0)).pow(2).mean()) * len(t)
            n += len(t)
    return total / n


@torch.no_grad()
def experts_vs_t(model, batches, routing: str, t_values) -> dict:
    """Fig. 6b: per MoE layer, the mean and the std over the validation tokens of the number of experts that
    processed a token, at every denoising time of `t_values` (conditional forwards of the validation images
    noised to that t with their fixed noise). {"t", "images", "mean_LT", "std_LT"}: [layer][t]."""
    mean_TL, std_TL = [], []
    with inference_routing(model, routing) as net:
        for t in t_values:
            per_batch = []
            for x0, emb, mask, _, noise in batches:
                t_B = torch.full((x0.shape[0],), float(t))
                out = net(interpolate(x0, noise, t_B), t_B, emb, mask, collect_stats=True)
                per_batch.append([s["expert_count"].float() for s in out.moe_stats])
            count_L = [torch.cat(layer) for layer in zip(*per_batch)]  # per layer [N*S]
            mean_TL.append([float(c.mean()) for c in count_L])
            std_TL.append([float(c.std(correction=0)) for c in count_L])
    return {"t": list(t_values), "images": sum(len(b[0]) for b in batches),
            "mean_LT": np.transpose(mean_TL).tolist(), "std_LT": np.transpose(std_TL).tolist()}


def score(images: torch.Tensor, prompts: list[dict]) -> dict:
    """The scorer's summary (strict and per attribute); the per-image reasons stay out of eval.json."""
    summary = score_images(images, prompts)
    summary.pop("results")
    return summary


def evaluate_run(rd: Path, args, prompt_sets: dict, mix: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A run's final checkpoint in every inference mode (dense: one): the eval.json record, and per mode the
    images of the first held-out prompts (for samples.png and heatmap.png)."""
    model, run_cfg, folder, weights = load_model(rd / "checkpoints", weights=args.weights, log=log)
    cfg = model.cfg
    text_encoder, vae = encoders(data_config(run_cfg, cfg))
    val = validation_batches(text_encoder, vae, args.val_images, mix, seed=1)
    modes = MODES if cfg.moe is not None else {DENSE_MODE: MODES[DENSE_MODE]}
    captions = {k: [caption_of(p) for p in v] for k, v in prompt_sets.items()}
    all_captions = captions["heldout"] + captions["train"]
    nh = len(captions["heldout"])
    result = {"checkpoint": str(folder), "weights": weights, "model": cfg.name, "modes": {}, "experts_vs_t": {},
              "geometry": {"grid": cfg.grid, "num_tokens": cfg.num_tokens, "moe_every": cfg.moe_every,
                           "num_experts": cfg.moe.num_experts if cfg.moe else None,
                           "num_moe_blocks": cfg.num_moe_blocks}}
    images = {}
    for name, routing in modes.items():
        r = {"val_loss": validation_loss(model, val, routing)}
        t0 = time.perf_counter()
        meter = LoadMeter(cfg.num_moe_blocks)
        latents = generate_latents(model, text_encoder, all_captions, args.sample_steps, args.guidance,
                                   args.eval_seed, args.batch_size, routing, meter=meter)
        load = meter.summary()
        seconds = time.perf_counter() - t0
        decoded = decode(vae, latents)
        r["scorer_heldout"] = score(decoded[:nh], prompt_sets["heldout"])
        r["scorer_train"] = score(decoded[nh:], prompt_sets["train"])
        r["ms_per_image"] = 1000 * seconds / len(all_captions)
        r["experts_per_token"] = load.get("experts_per_token")
        r["slots_run_per_token"] = load.get("slots_run_per_token")
        for key, slots in (("gflops_per_image", "slots_run_per_token"),
                           ("useful_gflops_per_image", "experts_per_token")):
            r[key] = args.sample_steps * sample_flops_per_image(cfg, routing, r[slots]) / 1e9
        if cfg.moe is not None:  # Fig. 6: how many experts processed each token, first prompts, t = 0.5
            k = min(HEAT_PROMPTS, nh)
            r["expert_count"] = [c.tolist() for c in routing_maps(model, text_encoder, all_captions[:k], latents[:k],
                                                                   0.5, args.eval_seed, routing)]
            result["experts_vs_t"][name] = experts_vs_t(model, val[:SWEEP_BATCHES], routing, T_VALUES)
        result["modes"][name] = r
        images[name] = decoded[:min(SHOW, nh)]
        log(f"{rd.name:18s} {name:10s} val {r['val_loss']:.4f} strict in-dist {r['scorer_train']['overall']:.3f} "
            f"held-out {r['scorer_heldout']['overall']:.3f} partial in-dist {r['scorer_train']['partial_overall']:.3f} "
            f"{r['ms_per_image']:.1f} ms/img {r['gflops_per_image']:.2f} GFLOPs/img")
    return result, images


def eval_settings(args, mix: dict) -> dict:
    """What an evaluation depends on besides the weights: the checkpoint step and the evaluation options."""
    settings = dict(step=args.steps, weights=args.weights, prompts=args.prompts, eval_seed=args.eval_seed,
                    val_images=args.val_images, sample_steps=args.sample_steps, guidance=args.guidance,
                    batch_size=args.batch_size, t_values=T_VALUES,
                    mix={k: v for k, v in mix.items()  # a later setting at its old value: as before it existed
                         if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]})
    return json.loads(json.dumps(settings))  # as read back from eval.json


def read_eval(rd: Path, settings: dict) -> dict | None:
    """A run's cached eval.json when it was made with `settings`, else None."""
    path = rd / "eval.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == settings else None


def ensure_eval(variant: str, seed: int, args, prompt_sets: dict, mix: dict) -> None:
    """Evaluate a run finished at --steps into its eval.json (and eval_images.npz), unless cached."""
    rd = run_dir(args.out, variant, seed)
    step = final_step(rd)
    if step != args.steps:
        log(f"{rd.name}: no checkpoint at step {args.steps} (latest: {step}); not evaluated")
        return
    settings = eval_settings(args, mix)
    if not args.reevaluate and read_eval(rd, settings) is not None:
        log(f"{rd.name}: evaluation cached in {rd / 'eval.json'}")
        return
    record, images = evaluate_run(rd, args, prompt_sets, mix)
    np.savez_compressed(rd / "eval_images.npz", **{m: im.numpy() for m, im in images.items()})
    tmp = rd / "eval.json.tmp"
    tmp.write_text(json.dumps(dict(record, variant=variant, seed=seed, settings=settings), indent=1))
    os.replace(tmp, rd / "eval.json")


# ---- phase 4: aggregation over seeds ------------------------------------------------------------

def collect_evals(out: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """{(variant, seed): eval.json record} of every run dir in `out` evaluated with `settings`, VARIANTS
    order then seed."""
    runs = {}
    for rd in sorted(out.glob("study-*-s*")):
        m = RUN_NAME.fullmatch(rd.name)
        if m is None:
            continue
        record = read_eval(rd, settings)
        if record is not None:
            runs[(m.group(1), int(m.group(2)))] = record
        elif (rd / "eval.json").is_file():
            log(f"{rd.name}: eval.json made at another step or with other settings; left out of the report")
    return dict(sorted(runs.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])))


def spread(values) -> dict:
    """Mean, min, max and std (over the seeds, population) of the values that are not None, their number n,
    and all values in seed order."""
    xs = [float(v) for v in values if v is not None]
    stats = dict(mean=float(np.mean(xs)), min=min(xs), max=max(xs), std=float(np.std(xs))) if xs else dict(
        mean=None, min=None, max=None, std=None)
    return dict(stats, n=len(xs), values=list(values))


def training_figures(curves: dict, window: int) -> dict[tuple[str, int], dict]:
    """Per run: final smoothed training loss, steps to the final loss of the dense run of the same seed
    (steps_to_dense) and of the mean over the dense runs (steps_to_dense_mean); None where not reached."""
    final = {run: float(smooth(losses, window)[-1]) for run, (_, losses, _) in curves.items()}
    dense = {seed: loss for (v, seed), loss in final.items() if v == "dense"}
    dense_mean = float(np.mean(list(dense.values()))) if dense else None
    return {run: {"final_loss": final[run],
                  "steps_to_dense": steps_to_reach(steps, losses, dense[run[1]], window) if run[1] in dense else None,
                  "steps_to_dense_mean": (steps_to_reach(steps, losses, dense_mean, window)
                                          if dense_mean is not None else None)}
            for run, (steps, losses, _) in curves.items()}


def mode_figures(m: dict) -> dict[str, float | None]:
    """The figures of one run in one mode that the report aggregates over seeds."""
    ept = m["experts_per_token"]
    out = {"val_loss": m["val_loss"], "experts_per_token": float(np.mean(ept)) if ept else None,
           "gflops_per_image": m["gflops_per_image"], "useful_gflops_per_image": m["useful_gflops_per_image"],
           "ms_per_image": m["ms_per_image"]}
    for split, key in SPLITS.items():
        out[f"strict_{split}"] = m[key]["overall"]
        out[f"partial_{split}"] = m[key]["partial_overall"]
        for a in ATTRIBUTES:
            out[f"{a}_{split}"] = m[key]["attributes"].get(a)
    return out


def summarize(runs: dict, figures: dict) -> dict[str, dict]:
    """Per variant: seeds, n, `spread` of every training figure, of every mode figure and the experts-vs-t
    curves averaged over the seeds (mean_LT: mean experts per token, std_LT: its std across tokens)."""
    summary = {}
    for v in dict.fromkeys(v for v, _ in runs):
        seeds = [s for w, s in runs if w == v]
        evals = [runs[(v, s)] for s in seeds]
        entry = {"seeds": seeds, "n": len(seeds)}
        for key in ("final_loss", "steps_to_dense", "steps_to_dense_mean"):
            entry[key] = spread([figures[(v, s)][key] for s in seeds])
        entry["modes"] = {}
        for mode in evals[0]["modes"]:
            per_seed = [mode_figures(e["modes"][mode]) for e in evals]
            entry["modes"][mode] = {k: spread([f[k] for f in per_seed]) for k in per_seed[0]}
        geo = evals[0]["geometry"]
        entry["experts_vs_t"] = {mode: {"t": curve["t"], "n": len(evals), "images": curve["images"],
                                        "layers": moe_layer_names(geo["num_moe_blocks"], geo["moe_every"]),
                                        **{k: np.mean([e["experts_vs_t"][mode][k] for e in evals], 0).tolist()
                                           for k in ("mean_LT", "std_LT")}}
                                 for mode, curve in evals[0]["experts_vs_t"].items()}
        summary[v] = entry
    return summary


def mode_spread(summary: dict, variant: str, mode: str, key: str) -> dict | None:
    """A variant's spread of a mode figure; the dense model's one mode stands for every mode."""
    modes = summary[variant]["modes"]
    m = modes.get(DENSE_MODE if variant == "dense" else mode)
    return None if m is None else m[key]


def claims(summary: dict) -> list[str]:
    """The differences whose min-max intervals over seeds do not overlap (both variants with >= 2 seeds): the
    final training loss, and per inference mode the validation loss and the strict and partial scores."""
    rows = [("final train loss", {v: e["final_loss"] for v, e in summary.items()})]
    for mode in MODES:
        for key, name in CLAIMED_MODE_FIGURES.items():
            rows.append((f"{name} ({mode})", {v: s for v in summary if (s := mode_spread(summary, v, mode, key))}))
    out = []
    for name, by_variant in rows:
        for a, b in combinations(by_variant, 2):
            sa, sb = by_variant[a], by_variant[b]
            if min(sa["n"], sb["n"]) < 2:
                continue
            lo, hi = (a, b) if sa["max"] < sb["min"] else (b, a) if sb["max"] < sa["min"] else (None, None)
            if lo is not None:
                out.append(f"{name}: {lo} {fmt_spread(by_variant[lo])} < {hi} {fmt_spread(by_variant[hi])}")
    return out


# ---- outputs --------------------------------------------------------------------------------------

def fmt_spread(s: dict | None, spec: str = ".4f") -> str:
    """'mean [min, max]' of a `spread` ('mean' alone for one value, '-' for none)."""
    if s is None or s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return format(s["mean"], spec)
    return f"{s['mean']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"


def fmt_steps(s: dict) -> str:
    """A steps-to-reach spread with how many seeds reached the target."""
    return f"{fmt_spread(s, '.0f')} ({s['n']}/{len(s['values'])} reached)"


def plot_losses(curves: dict, path: Path, window: int) -> None:
    """Smoothed training loss of every run, one colour per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    labelled = set()
    for (v, seed), (steps, losses, _) in curves.items():
        ax.plot(steps, smooth(losses, window), color=colors[v], alpha=0.8, lw=1.2,
                label=None if v in labelled else LABELS[v])
        labelled.add(v)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {window} logs)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(title="one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_load(record: dict, num_experts: int) -> list[float]:
    """Per expert, its share of the slots at a run's last logged step, mean over the MoE layers."""
    layers = sorted({k.split("/")[1] for k in record if k.startswith("moe/") and "/load/" in k})
    return [float(np.mean([record[f"moe/{layer}/load/e{e}"] for layer in layers])) for e in range(num_experts)]


def plot_load(loads: dict, counts: dict, num_experts: int, path: Path) -> None:
    """Top: per-expert share of the slots in training (last logged step, mean over MoE layers and seeds).
    Bottom: histogram of experts per token in each inference mode (all MoE layers and seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(loads)
    fig, axes = plt.subplots(2, len(variants), figsize=(4 * len(variants), 6.5), squeeze=False)
    for j, v in enumerate(variants):
        ax = axes[0, j]
        ax.bar(range(num_experts), loads[v])
        ax.axhline(1 / num_experts, color="k", lw=0.8, ls="--")
        ax.set_title(f"{LABELS[v]}: training load", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of expert slots")
        ax = axes[1, j]
        for mode, c in counts[v].items():
            ax.hist(c, bins=np.arange(num_experts + 2) - 0.5, alpha=0.5, density=True, label=mode)
        ax.set_title(f"{LABELS[v]}: experts per token (inference)", fontsize=9)
        ax.set_xlabel("experts that processed the token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_experts_vs_t(summary: dict, path: Path) -> None:
    """Fig. 6b: per MoE variant two rows (mean experts per token; its std across tokens) against t, one
    column per inference mode, one line per MoE layer (means over the seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [v for v, e in summary.items() if e["experts_vs_t"]]
    fig, axes = plt.subplots(2 * len(variants), len(MODES), figsize=(4 * len(MODES), 2.6 * 2 * len(variants)),
                             squeeze=False, sharex=True)
    for i, v in enumerate(variants):
        for j, mode in enumerate(MODES):
            curve = summary[v]["experts_vs_t"][mode]
            names = curve["layers"]
            for row, key, what in ((2 * i, "mean_LT", "mean experts / token"),
                                   (2 * i + 1, "std_LT", "std across tokens")):
                ax = axes[row, j]
                for name, ys in zip(names, curve[key]):
                    ax.plot(curve["t"], ys, marker="o", ms=3, label=name)
                ax.set_title(f"{LABELS[v]} / {mode}", fontsize=9)
                ax.set_ylabel(what)
                ax.grid(alpha=0.3)
            axes[2 * i, j].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("denoising time t (1 = noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stack_captioned(rows):
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


def write_figures(out: Path, runs: dict, curves: dict, summary: dict, prompt_sets: dict, window: int) -> None:
    """loss.png, and from the first seed of each variant samples.png; for the MoE variants load.png,
    heatmap.png (Fig. 6, group and dynamic modes) and experts_vs_t.png (Fig. 6b)."""
    plot_losses(curves, out / "loss.png", window)
    first = {v: (v, e["seeds"][0]) for v, e in summary.items()}
    images = {v: np.load(run_dir(out, *run) / "eval_images.npz") for v, run in first.items()}
    n_show = min(SHOW, len(prompt_sets["heldout"]))
    grid = torch.cat([torch.from_numpy(images[v][DENSE_MODE][:n_show]) for v in summary])
    captions = [f"{v}: {caption_of(p)}" for v in summary for p in prompt_sets["heldout"][:n_show]]
    save_png(image_grid(grid, nrow=n_show, captions=captions), out / "samples.png")
    moe = [v for v in summary if summary[v]["experts_vs_t"]]
    if not moe:
        return
    geo = runs[first[moe[0]]]["geometry"]
    E = geo["num_experts"]
    loads = {v: np.mean([train_load(curves[(v, s)][2], E) for s in summary[v]["seeds"]], 0) for v in moe}
    counts = {v: {m: np.concatenate([np.ravel(c) for s in summary[v]["seeds"]
                                     for c in runs[(v, s)]["modes"][m]["expert_count"]])
                  for m in MODES} for v in moe}
    plot_load(loads, counts, E, out / "load.png")
    rows = []
    for v in moe:
        for m in ("group", "dynamic"):
            maps = [torch.tensor(c) for c in runs[first[v]]["modes"][m]["expert_count"]]
            k = len(maps[0]) // geo["num_tokens"]
            rows.append((f"{LABELS[v]} / {m} (seed {first[v][1]})",
                         expert_heatmap_layers(maps, batch=k, grid=geo["grid"], num_experts=E,
                                               images=torch.from_numpy(images[v][m][:k]),
                                               layer_names=moe_layer_names(len(maps), geo["moe_every"]))))
    save_png(stack_captioned(rows), out / "heatmap.png")
    plot_experts_vs_t(summary, out / "experts_vs_t.png")


def write_markdown(path: Path, summary: dict, claimed: list[str], args, recipe: dict) -> None:
    n_seeds = sorted({s for e in summary.values() for s in e["seeds"]})
    lines = [f"# Routing study ({args.steps} steps, batch {recipe.get('batch_size', '?')}, study shapes mix, "
             f"seeds {', '.join(map(str, n_seeds))})", "",
             f"Each cell: mean [min, max] over the n seeds of the variant (the spread is the min-max range; one "
             f"value alone when n = 1). Trainer settings: {json.dumps(recipe)}. Evaluated weights: {args.weights}.",
             "", "## Claims", ""]
    lines += (["Differences that exceed the seed spread (min-max intervals do not overlap, n >= 2 each): "
               + "; ".join(claimed) + "."] if claimed else
              ["No difference exceeds the seed spread (no pair of min-max intervals is disjoint with n >= 2 each): "
               "nothing is claimed."])
    lines += ["", "## Training", "",
              "| model | n | final train loss (smoothed) | steps to the same-seed dense final loss | "
              "steps to the mean dense final loss |", "|---|---|---|---|---|"]
    for v, e in summary.items():
        lines.append(f"| {LABELS[v]} | {e['n']} | {fmt_spread(e['final_loss'])} | {fmt_steps(e['steps_to_dense'])} | "
                     f"{fmt_steps(e['steps_to_dense_mean'])} |")
    lines += ["", "## Validation loss per inference mode", "",
              f"Fixed validation images ({args.val_images}), noise and t; all tokens. The dense model has one mode.",
              "", "| model | n | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for v, e in summary.items():
        cells = [fmt_spread(mode_spread(summary, v, m, "val_loss")) for m in MODES]
        lines.append(f"| {LABELS[v]} | {e['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Shapes scorer", "",
              f"Strict: the image matches its prompt in everything; partial: the mean of the per-attribute credits "
              f"({args.prompts} in-distribution prompts of the mix and {args.prompts} held-out-composition prompts, "
              f"eval seed {args.eval_seed}, {args.sample_steps} Euler steps, CFG {args.guidance}; {CHANCE}).", "",
              "| model | mode | n | strict in-dist | strict held-out | partial in-dist | partial held-out |",
              "|---|---|---|---|---|---|---|"]
    for v, e in summary.items():
        for mode, figs in e["modes"].items():
            cells = [fmt_spread(figs[k], ".3f")
                     for k in ("strict_in", "strict_heldout", "partial_in", "partial_heldout")]
            lines.append(f"| {LABELS[v]} | {mode} | {e['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per-attribute credit (in-distribution / held-out prompts)", "",
              "| model | mode | " + " | ".join(ATTRIBUTES) + " |", "|---|---|" + "---|" * len(ATTRIBUTES)]
    for v, e in summary.items():
        for mode, figs in e["modes"].items():
            cells = [f"{fmt_spread(figs[f'{a}_in'], '.2f')} / {fmt_spread(figs[f'{a}_heldout'], '.2f')}"
                     for a in ATTRIBUTES]
            lines.append(f"| {LABELS[v]} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Compute", "",
              "GFLOPs per image for all sampling steps (conditional + unconditional); `useful` counts only the "
              "expert slots that hold a token; experts/token measured while sampling (mean over MoE layers).", "",
              "| model | mode | experts/token | GFLOPs/img | useful | ms/img |", "|---|---|---|---|---|---|"]
    for v, e in summary.items():
        for mode, figs in e["modes"].items():
            cells = [fmt_spread(figs[k], spec) for k, spec in COMPUTE_COLUMNS]
            lines.append(f"| {LABELS[v]} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Experts per token against the denoising time (Fig. 6b)", "",
              f"Mean experts per token (std across the tokens of the first "
              f"{min(args.val_images, SWEEP_BATCHES * VAL_BATCH)} validation images), conditional forwards at "
              "fixed t, means over seeds; t = 1 is pure noise.", "",
              "| model | mode | layer | " + " | ".join(f"t={t:.2f}" for t in T_VALUES) + " |",
              "|---|---|---|" + "---|" * len(T_VALUES)]
    for v, e in summary.items():
        for mode, curve in e["experts_vs_t"].items():
            for name, means, stds in zip(curve["layers"], curve["mean_LT"], curve["std_LT"]):
                cells = [f"{m:.2f} ({s:.2f})" for m, s in zip(means, stds)]
                lines.append(f"| {LABELS[v]} | {mode} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: loss.png, load.png, heatmap.png, samples.png, experts_vs_t.png", ""]
    path.write_text("\n".join(lines))


def report(args, mix: dict, prompt_sets: dict, recipe: dict) -> None:
    """study.md, study.json and the plots from every run in --out evaluated at --steps with these settings."""
    runs = collect_evals(args.out, eval_settings(args, mix))
    if not runs:
        raise SystemExit(f"no run in {args.out} is evaluated at step {args.steps} with these settings")
    curves = {run: read_losses(run_dir(args.out, *run)) for run in runs}
    figures = training_figures(curves, args.smooth)
    summary = summarize(runs, figures)
    claimed = claims(summary)
    write_figures(args.out, runs, curves, summary, prompt_sets, args.smooth)
    write_markdown(args.out / "study.md", summary, claimed, args, recipe)
    per_run = {f"{v}-s{s}": dict({k: x for k, x in r.items() if k != "modes"}, **figures[(v, s)],
                                 modes={m: {k: x for k, x in fig.items() if k != "expert_count"}
                                        for m, fig in r["modes"].items()})
               for (v, s), r in runs.items()}
    write_json(args.out / "study.json", {"environment": environment("cpu"), "steps": args.steps, "recipe": recipe,
                                         "settings": eval_settings(args, mix), "spread": "min-max over seeds",
                                         "summary": summary, "claims": claimed, "runs": per_run,
                                         "heldout_prompts": prompt_sets["heldout"],
                                         "train_prompts": prompt_sets["train"]})
    print((args.out / "study.md").read_text())


def recipe_of(app) -> dict:
    """The trainer settings the report states (from a composed AppConfig)."""
    return {"batch_size": app.data.batch_size, "image_size": app.data.image_size, "lr": app.optim.lr,
            "warmup_steps": app.optim.warmup_steps, "ema_decay": app.train.ema_decay, "t_mean": app.flow.t_mean,
            "patch_size": app.model.patch_size, "mask_ratio": app.model.mask_ratio}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="runs, data and results folder")
    p.add_argument("--experiment", default="study_cpu", help="Hydra experiment config (conf/experiment/)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="variants to train and evaluate (the report covers every evaluated run in --out)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                   help="training seeds (train.seed and data.seed) to train and evaluate")
    p.add_argument("--steps", type=int, default=900, help="training steps of every run")
    p.add_argument("--data-samples", type=int, default=20000, help="shapes training images")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--prompts", type=int, default=48, help="scorer prompts per set (held-out and in-distribution)")
    p.add_argument("--val-images", type=int, default=256, help="validation images for the validation loss and Fig. 6b")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the scorer prompts and the sampling noise")
    p.add_argument("--weights", choices=WEIGHTS, default="ema",
                   help="evaluate the EMA of the parameters (raw, with a note, for runs without one) or the raw ones")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window (logged steps) of the loss curves")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation")
    p.add_argument("--skip-train", action="store_true", help="evaluate the finished runs only")
    p.add_argument("--reevaluate", action="store_true", help="evaluate again even where eval.json is cached")
    p.add_argument("--wandb-mode", default="disabled", choices=("offline", "online", "disabled"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run (e.g. data.batch_size=8)")
    args = p.parse_args(argv)
    for name in ("steps", "data_samples", "shard_size", "prompts", "val_images", "sample_steps", "batch_size",
                 "threads", "smooth"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))} must be distinct and >= 0")
    args.variants = [v for v in VARIANTS if v in args.variants]  # dense first: the reference
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--preset"] or argv[:1] == ["--preset=paper-claims"]:  # the paper's claims
        preset = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
        if preset != "paper-claims":
            raise SystemExit(f"--preset {preset!r}: the one preset is paper-claims (bench/paper_claims.py)")
        # Its own process (it imports this module), a child rather than exec: main() returns to its caller.
        script = Path(__file__).with_name("paper_claims.py")
        return subprocess.run([sys.executable, str(script), *argv[1 if "=" in argv[0] else 2:]]).returncode
    args = parse_args(argv)
    if not extras.installed("study"):  # the report's plots; refused before hours of training
        print(f"error: {extras.message('study', 'bench/study.py')}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    shards = ensure_data(args.out, args.data_samples, args.shard_size)
    mix = read_mix(str(args.out / DATA_DIR))
    planned = planned_models(args, shards)
    check_batches({v: mcfg for v, (_, mcfg) in planned.items()}, args)
    if not args.skip_train:
        for v in args.variants:
            for seed in args.seeds:
                train_run(v, seed, args, shards)
    prompt_sets = {"heldout": heldout_prompts(args.prompts, args.eval_seed, categories=mix["categories"]),
                   "train": training_prompts(args.prompts, args.eval_seed, **mix)}
    for v in args.variants:
        for seed in args.seeds:
            ensure_eval(v, seed, args, prompt_sets, mix)
    report(args, mix, prompt_sets, recipe_of(next(iter(planned.values()))[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
