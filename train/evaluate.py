"""Evaluate a checkpoint with the shapes scorer (GenEval-like accuracy), by default on held-out compositions.

    python -m train.evaluate --checkpoint runs/cpu-small/checkpoints                  # 48 held-out prompts
    python -m train.evaluate --checkpoint runs/cpu-small/checkpoints --split train    # in-distribution prompts
    python -m train.evaluate --checkpoint ... --split train --shapes-dir runs/shapes-quickstart  # that set's mix
    python -m train.evaluate --checkpoint export/ --prompt-file prompts.txt --samples-per-prompt 4 --out eval/
    python -m train.evaluate --checkpoint ... --fid-real runs/shapes --inception-weights pt_inception.pth

Prompts: --prompt-file (captions one per line, parsed by data.synthetic.parse_caption, or a .jsonl of prompt
structures), else `heldout_prompts` (--split heldout: every prompt states a (color, shape) pair that the
shapes dataset never shows) or `training_prompts` (--split train), in the prompt mix of --shapes-dir (the set
the model was trained on; default: the standard mix). Sample k of prompt i is generated from
the noise of index i * samples_per_prompt + k (train.generate.prompt_noise), so every image has its own noise.
`--weights ema|raw` (default ema) as in train.sample; eval.json records which weights were evaluated.

Writes OUT/eval.json (overall = mean of the per-category strict accuracies, per_category, n, sample_accuracy,
partial_overall / partial_per_category / attributes: the per-attribute credit of data/scorer.py, the
settings, timing, fid, and per sample its caption, correctness and the scorer's reason) and OUT/grid.png
(captioned, "[ok]" / "[x]"). FID against real images needs --fid-real and --inception-weights (a local
Inception-v3 FID weights file; nothing is downloaded) and torch-fidelity (directly or via torchmetrics);
otherwise it is skipped with a one-line message and eval.json has "fid": null and "fid_skipped" (the reason).

From Python (e.g. a benchmark):

    result = evaluate(model, text_encoder, vae, heldout_prompts(48), steps=20)  # dict; result["images"]
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from data.scorer import ATTRIBUTES, attribute_credit, partial_score, score_image, summarize, summarize_attributes
from data.synthetic import (CATEGORIES, HELDOUT_PAIRS, caption_of, heldout_prompts, parse_caption, read_mix,
                            stated_heldout, training_prompts)
from train.cli import (OneLineParser, add_encoder_args, add_generation_args, check_generation_args, check_positive,
                       parse_device, run_cli)
from train.generate import SampleError, generate
from train.inference_model import DATA_KEYS, check_compatible, data_config, load_model
from train.visualize import image_grid, save_png, to_uint8

SPLITS = {"heldout": "held-out compositions", "train": "in-distribution prompts"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# ---- prompts ------------------------------------------------------------------------------------

def default_prompts(split: str, n: int, seed: int = 0, shapes_dir: str | None = None) -> list[dict]:
    """`n` prompt structures of --split heldout (held-out compositions) or train (in-distribution), in the
    prompt mix of the set in `shapes_dir` (its shapes.json; None: the standard mix)."""
    if split not in SPLITS:
        raise SampleError(f"--split {split!r} must be one of {tuple(SPLITS)}")
    try:
        mix = read_mix(shapes_dir) if shapes_dir is not None else {}
        if split == "heldout":
            return heldout_prompts(n, seed, **({"categories": mix["categories"]} if mix else {}))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SampleError(f"--shapes-dir {shapes_dir}: {e}") from None
    return training_prompts(n, seed, **mix)


def read_prompt_file(path: str | Path) -> list[dict]:
    """Prompt structures from a text file (one caption per line; blank lines and '#' comments skipped) or
    a .jsonl file (one prompt structure per line, {"groups": [...], "relation": ...}, or {"caption": ...}).
    Every prompt is normalised through its caption, so it is one the scorer and the text encoder agree on."""
    f = Path(path)
    if not f.is_file():
        raise SampleError(f"--prompt-file {f} does not exist")
    out = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if f.suffix == ".jsonl":
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
                out.append(parse_caption(obj["caption"] if "caption" in obj else caption_of(obj)))
            else:
                out.append(parse_caption(line))
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise SampleError(f"--prompt-file {f} line {n}: {what}") from None
    if not out:
        raise SampleError(f"--prompt-file {f} has no prompts (one caption per line)")
    return out


# ---- scoring and evaluation ---------------------------------------------------------------------

def score_images(images, prompts: Sequence[dict]) -> dict:
    """Score images against prompt structures: `summarize` (overall, per_category, n, sample_accuracy),
    `summarize_attributes` (attributes, partial_per_category, partial_overall) and "results", per image
    {"correct", "reason", "partial", "credit"}. images: [N, 3, H, W] in [-1, 1] (what the VAE
    decodes to) or a sequence of uint8 [H, W, 3] arrays."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)  # [N, H, W, 3]
    if len(images) != len(prompts):
        raise ValueError(f"score_images: {len(images)} images for {len(prompts)} prompts")
    images = [np.asarray(img) for img in images]
    scored = [score_image(img, p) for img, p in zip(images, prompts)]
    credits = [attribute_credit(img, p) for img, p in zip(images, prompts)]
    categories = [p["category"] for p in prompts]
    summary = dict(summarize(categories, [ok for ok, _ in scored]), **summarize_attributes(categories, credits))
    return dict(summary, results=[{"correct": ok, "reason": reason, "partial": partial_score(c), "credit": c}
                                  for (ok, reason), c in zip(scored, credits)])


def evaluate(model, text_encoder: Callable, vae, prompts: Sequence[dict], samples_per_prompt: int = 1,
             steps: int = 20, guidance: float = 4.0, seed: int = 0, batch_size: int = 8, routing: str = "sample",
             group_size: int | None = None, shift: float = 1.0, log: Callable[[str], None] | None = None,
             multiplier: float | None = None) -> dict:
    """Generate `samples_per_prompt` images per prompt structure (train.generate.generate; sample k of
    prompt i uses the noise of index i * samples_per_prompt + k) and score them.

    Returns the `score_images` summary (overall, per_category, n, sample_accuracy) plus
    heldout_accuracy (images whose prompt states a held-out pair; None if none does), results (per image:
    prompt, sample, noise_index, caption, category, heldout, correct, reason), images ([N, 3, H, W] in
    [-1, 1], prompt-major), generate_s, score_s and images_per_s.
    """
    if samples_per_prompt < 1:
        raise SampleError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    prompts = list(prompts)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]  # prompt-major
    captions = [caption_of(p) for p in expanded]
    t0 = time.perf_counter()
    images = generate(model, text_encoder, vae, captions, steps, guidance, seed, batch_size, routing, group_size,
                      shift, log, multiplier)
    t1 = time.perf_counter()
    scores = score_images(images, expanded)
    t2 = time.perf_counter()
    results = []
    for j, (p, caption, r) in enumerate(zip(expanded, captions, scores.pop("results"))):
        results.append(dict(prompt=j // samples_per_prompt, sample=j % samples_per_prompt, noise_index=j,
                            caption=caption, category=p["category"], heldout=bool(stated_heldout(p)), **r))
    held = [r["correct"] for r in results if r["heldout"]]
    return dict(scores, heldout_accuracy=float(np.mean(held)) if held else None, results=results, images=images,
                generate_s=t1 - t0, score_s=t2 - t1, images_per_s=len(expanded) / max(t1 - t0, 1e-9))


# ---- FID ----------------------------------------------------------------------------------------

def _image_files(spec: str) -> tuple[list[str], list[str]]:
    """(image files, tar shards) named by --fid-real: a folder of images (or, without any, of .tar shards),
    one .tar, or a brace pattern of shards."""
    if os.path.isdir(spec):
        files = sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                       if f.lower().endswith(IMAGE_EXTS))
        return (files, []) if files else ([], sorted(glob.glob(os.path.join(spec, "*.tar"))))
    from braceexpand import braceexpand  # a webdataset dependency

    tars = list(braceexpand(spec))
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise SampleError(f"--fid-real {spec}: {missing[0]} does not exist" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [], tars


def check_fid_real(spec: str) -> None:
    """Fail early (before any generation) when --fid-real names no images."""
    if not os.path.exists(spec) and "{" not in spec:
        raise SampleError(f"--fid-real {spec} does not exist")
    files, tars = _image_files(spec)
    if not files and not tars:
        raise SampleError(f"--fid-real {spec} holds no .png/.jpg images and no .tar shards")


def load_real_images(spec: str, size: int, max_images: int) -> torch.Tensor:
    """Up to `max_images` real images from --fid-real as uint8 [N, 3, size, size] (bicubic-resized to the
    generated resolution when they differ)."""
    files, tars = _image_files(spec)

    def blobs():
        for f in files:
            yield Path(f).read_bytes()
        for t in tars:
            with tarfile.open(t) as tf:
                for m in tf:
                    if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                        yield tf.extractfile(m).read()

    out = []
    for blob in blobs():
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))  # [3, H, W]
        if len(out) >= max_images:
            break
    if not out:
        raise SampleError(f"--fid-real {spec} holds no readable images")
    return torch.stack(out)


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 [3, H, W] tensors, the input torch-fidelity expects from a Dataset."""

    def __init__(self, images_NCHW: torch.Tensor):
        self.images = images_NCHW

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def compute_fid(fake_NCHW: torch.Tensor, real_NCHW: torch.Tensor, weights: str,
                device: str | torch.device = "cpu") -> tuple[float | None, str]:
    """(FID, backend) of uint8 [N, 3, H, W] fake vs real images with the Inception-v3 FID weights at
    `weights` (a local file: nothing is downloaded), through torch-fidelity, else torchmetrics;
    (None, why) when neither can run."""
    cuda = torch.device(device).type == "cuda"
    try:
        import torch_fidelity
    except ImportError:
        torch_fidelity = None
    if torch_fidelity is not None:
        m = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(fake_NCHW), input2=_Uint8Images(real_NCHW), fid=True, cuda=cuda,
            feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), cache=False,
            verbose=False, save_cpu_ram=True, datasets_download=False)
        return float(m["frechet_inception_distance"]), "torch-fidelity"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "neither torch-fidelity nor torchmetrics is installed (pip install torch-fidelity)"
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except (ImportError, TypeError) as e:  # its Inception-v3 comes from torch-fidelity; old versions lack the kwarg
        return None, f"torchmetrics FID unavailable: {str(e).splitlines()[0]}"
    fid = fid.to(device)
    for imgs, real in ((real_NCHW, True), (fake_NCHW, False)):
        for s in range(0, imgs.shape[0], 64):
            fid.update(imgs[s:s + 64].to(device), real=real)
    return float(fid.compute()), "torchmetrics"


# ---- CLI ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generation_args(p)
    p.add_argument("--prompt-file", default=None,
                   help="captions one per line, or a .jsonl of prompt structures (default: --split prompts)")
    p.add_argument("--split", choices=tuple(SPLITS), default="heldout",
                   help="default prompts: heldout = compositions never in the shapes training set, "
                   "train = in-distribution")
    p.add_argument("--shapes-dir", default=None,
                   help="the shapes set the model was trained on: default prompts follow its prompt mix (its "
                   "shapes.json; default: the standard mix of python -m data.synthetic)")
    p.add_argument("--num-prompts", type=int, default=48, help="number of default prompts")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the default prompts")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="images per prompt (each with its own noise)")
    p.add_argument("--out", default="eval", help="output folder (eval.json, grid.png)")
    p.add_argument("--nrow", type=int, default=8, help="images per row of grid.png")
    p.add_argument("--grid-max", type=int, default=64, help="at most this many images in grid.png")
    g = p.add_argument_group("FID (optional; meaningful with thousands of images)")
    g.add_argument("--fid-real", default=None,
                   help="real images: a folder of .png/.jpg (or of .tar shards), a .tar, or a shard brace pattern")
    g.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 FID weights file (torch-fidelity's feature_extractor_weights_path)")
    g.add_argument("--fid-max-real", type=int, default=10000, help="at most this many real images")
    add_encoder_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


def _check_args(args: argparse.Namespace) -> torch.device:
    check_generation_args(args)
    check_positive(args, "num_prompts", "samples_per_prompt", "nrow", "grid_max", "fid_max_real")
    if args.fid_real is not None:
        check_fid_real(args.fid_real)
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise SampleError(f"--inception-weights {args.inception_weights} is not a file")
    return parse_device(args.device)


def _run(args: argparse.Namespace) -> int:
    device = _check_args(args)
    if args.prompt_file is not None:
        prompts, source = read_prompt_file(args.prompt_file), f"file {args.prompt_file}"
    else:
        prompts, source = (default_prompts(args.split, args.num_prompts, args.prompt_seed, args.shapes_dir),
                           SPLITS[args.split] + (f" of {args.shapes_dir}" if args.shapes_dir else ""))

    t0 = time.perf_counter()
    model, run_cfg, folder, weights = load_model(args.checkpoint, device, args.weights)
    cfg = model.cfg
    dcfg = data_config(run_cfg, cfg, text_encoder=args.text_encoder, text_encoder_path=args.text_encoder_path,
                       max_text_len=args.max_text_len, vae=args.vae, vae_path=args.vae_path)
    from data import load_text_encoder, load_vae

    text_encoder, vae = load_text_encoder(dcfg, device), load_vae(dcfg, device)
    check_compatible(cfg, text_encoder, vae, dcfg)
    load_s = time.perf_counter() - t0
    n = len(prompts) * args.samples_per_prompt
    print(f"[eval] model {cfg.name} from {folder}, {weights} weights ({load_s:.1f}s); {len(prompts)} prompts ({source}) x "
          f"{args.samples_per_prompt} = {n} images, {args.steps} steps, guidance {args.guidance}, "
          f"routing {args.routing}")

    r = evaluate(model, text_encoder, vae, prompts, args.samples_per_prompt, args.steps, args.guidance, args.seed,
                 args.batch_size, args.routing, args.group_size, args.shift, log=print,
                 multiplier=args.dynamic_multiplier)
    images = r.pop("images")  # [N, 3, H, W] in [-1, 1]

    fid, fid_skipped, fid_backend, fid_s = None, None, None, 0.0
    if args.fid_real is None or args.inception_weights is None:
        missing = [o for o, v in (("--fid-real", args.fid_real), ("--inception-weights", args.inception_weights))
                   if v is None]
        fid_skipped = f"no {' / '.join(missing)} given"
    else:
        t1 = time.perf_counter()
        real = load_real_images(args.fid_real, images.shape[-1], args.fid_max_real)
        print(f"[eval] FID: {n} generated vs {real.shape[0]} real images")
        fake = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, H, W]
        try:
            fid, fid_backend = compute_fid(fake, real, args.inception_weights, device)
        except Exception as e:  # e.g. weights that are not Inception's: keep the accuracy results
            fid, fid_backend = None, f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if fid is None:  # fid_backend holds the reason
            fid_skipped, fid_backend = fid_backend, None
        fid_s = time.perf_counter() - t1
    if fid_skipped:
        print(f"[eval] FID skipped: {fid_skipped}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = min(n, args.grid_max)
    marks = [f"[{'ok' if x['correct'] else 'x'}] {x['caption']}" for x in r["results"][:shown]]
    save_png(image_grid(images[:shown], nrow=args.nrow, captions=marks), out / "grid.png")
    results = r.pop("results")
    summary = {k: r[k] for k in ("overall", "per_category", "n", "sample_accuracy", "heldout_accuracy",
                                 "partial_overall", "partial_per_category", "attributes")}
    report = dict(
        checkpoint=str(folder), weights=weights, model=cfg.name, prompts=source, num_prompts=len(prompts),
        samples_per_prompt=args.samples_per_prompt, **summary, fid=fid, fid_skipped=fid_skipped,
        fid_backend=fid_backend,
        settings=dict(steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                      prompt_seed=args.prompt_seed, split=None if args.prompt_file else args.split,
                      batch_size=args.batch_size, routing=args.routing, group_size=args.group_size,
                      dynamic_multiplier=args.dynamic_multiplier, device=str(device), heldout_pairs=sorted(HELDOUT_PAIRS),
                      data={k: getattr(dcfg, k) for k in DATA_KEYS}),
        timing=dict(load_s=load_s, generate_s=r["generate_s"], score_s=r["score_s"], fid_s=fid_s,
                    images_per_s=r["images_per_s"], total_s=time.perf_counter() - t0),
        results=results)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    per = ", ".join(f"{c} {summary['per_category'][c]:.2f}" for c in CATEGORIES if c in summary["per_category"])
    print(f"[eval] overall {summary['overall']:.3f} ({per}; {sum(x['correct'] for x in results)}/{n} images correct)"
          + (f", FID {fid:.2f}" if fid is not None else ""))
    attrs = ", ".join(f"{a} {summary['attributes'][a]:.2f}" for a in ATTRIBUTES if a in summary["attributes"])
    print(f"[eval] per attribute: partial {summary['partial_overall']:.3f} ({attrs}; chance levels per prompt mix: "
          "data/scorer.py)")
    print(f"[eval] wrote {out / 'eval.json'} and {out / 'grid.png'} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
