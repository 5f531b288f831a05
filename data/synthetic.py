"""The embedded "shapes" dataset: procedurally drawn colored shapes with compositional captions.

Each sample is a small RGB image (default 32x32) with 1-4 objects on a light background and a caption that
states what the scorer (data/scorer.py) can check: count, color, shape and spatial relation, e.g.
"two red circles left of a blue square". Six prompt categories mirror GenEval: single_object,
two_objects, counting, colors, position, color_attr. Sample i depends only on (seed, i), so any range can
be generated independently and the set is deterministic. Written as WebDataset shards: png + txt + json.

CLI: python -m data.synthetic --out data/shapes --num-samples 5000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (245, 245, 245)
# Distinct hues (0, 55, 125, 185, 230, 280 deg) so the scorer can classify blurred pixels by hue.
COLORS = {
    "red": (225, 30, 30),
    "yellow": (235, 210, 20),
    "green": (30, 175, 45),
    "cyan": (25, 195, 215),
    "blue": (35, 65, 225),
    "purple": (150, 40, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
GAP = 2  # min pixels between objects' boxes, so connected components never merge


def _phrase(count: int, color: str | None, shape: str) -> str:
    words = [NUMBERS[count]] + ([color] if color else []) + [shape + ("s" if count > 1 else "")]
    return " ".join(words)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _prompt(rng: np.random.Generator, category: str) -> dict:
    """Prompt structure: groups of (count, color or None if unstated, shape) and an optional relation."""
    colors, shapes = list(COLORS), list(SHAPES)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    relation = None
    if category == "single_object":
        groups = [dict(count=1, color=None, shape=pick(shapes))]
    elif category == "colors":
        groups = [dict(count=1, color=pick(colors), shape=pick(shapes))]
    elif category == "counting":
        groups = [dict(count=int(rng.integers(2, 5)), color=pick(colors), shape=pick(shapes))]
    elif category == "two_objects":
        s1, s2 = rng.choice(len(shapes), 2, replace=False)
        groups = [dict(count=1, color=None, shape=shapes[s1]), dict(count=1, color=None, shape=shapes[s2])]
    elif category == "color_attr":
        c1, c2 = rng.choice(len(colors), 2, replace=False)
        groups = [dict(count=1, color=colors[c1], shape=pick(shapes)), dict(count=1, color=colors[c2], shape=pick(shapes))]
    elif category == "position":
        while True:
            g1 = dict(count=int(rng.integers(1, 3)), color=pick(colors), shape=pick(shapes))
            g2 = dict(count=int(rng.integers(1, 3)), color=pick(colors), shape=pick(shapes))
            if (g1["color"], g1["shape"]) != (g2["color"], g2["shape"]):
                break
        groups, relation = [g1, g2], pick(list(RELATIONS))
    else:
        raise ValueError(f"unknown category {category!r}")
    return dict(category=category, groups=groups, relation=relation)


def caption_of(prompt: dict) -> str:
    """The caption text of a prompt structure."""
    parts = [_phrase(g["count"], g["color"], g["shape"]) for g in prompt["groups"]]
    if prompt["relation"]:
        return f"{parts[0]} {prompt['relation']} {parts[1]}"
    return " and ".join(parts)


def _region(relation: str | None, group: int, size: int) -> tuple[int, int, int, int]:
    """Allowed pixel area (x0, y0, x1, y1 inclusive) for a group's objects; halves for relations."""
    full = (1, 1, size - 2, size - 2)
    if relation is None:
        return full
    first_low = relation in ("left of", "above")  # group 0 goes to the low-coordinate half
    low = (group == 0) == first_low
    half = size // 2
    lo, hi = (1, half - 2) if low else (half + 1, size - 2)
    return (lo, 1, hi, size - 2) if relation in ("left of", "right of") else (1, lo, size - 2, hi)


def _place(rng, prompt, size) -> list[dict] | None:
    """Random non-overlapping boxes for every object; None if this draw failed (caller retries)."""
    smin, smax = max(5, round(7 * size / 32)), max(6, round(11 * size / 32))
    objects, boxes = [], []
    for gi, g in enumerate(prompt["groups"]):
        rx0, ry0, rx1, ry1 = _region(prompt["relation"], gi, size)
        for _ in range(g["count"]):
            for _try in range(50):
                s = int(rng.integers(smin, smax + 1))
                if rx1 - rx0 + 1 < s or ry1 - ry0 + 1 < s:
                    return None
                x0, y0 = int(rng.integers(rx0, rx1 - s + 2)), int(rng.integers(ry0, ry1 - s + 2))
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                if all(box[0] > b[2] + GAP or box[2] < b[0] - GAP or box[1] > b[3] + GAP or box[3] < b[1] - GAP for b in boxes):
                    break
            else:
                return None
            boxes.append(box)
            color = g["color"] or list(COLORS)[int(rng.integers(len(COLORS)))]
            objects.append(dict(shape=g["shape"], color=color, box=list(box), group=gi))
    return objects


def generate_sample(index: int, seed: int = 0, image_size: int = 32) -> tuple[np.ndarray, str, dict]:
    """Sample `index` of the set: (image uint8 [H, W, 3], caption, prompt structure incl. objects)."""
    rng = np.random.default_rng([seed, index])
    while True:
        prompt = _prompt(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        objects = _place(rng, prompt, image_size)
        if objects is not None:
            break
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw(draw, o["shape"], tuple(o["box"]), COLORS[o["color"]])
    prompt = dict(prompt, objects=objects, index=index, seed=seed)
    return np.asarray(img), caption_of(prompt), prompt


def encode_sample(index: int, seed: int, image_size: int) -> dict:
    """One WebDataset sample: png (lossless, so colors stay exact), txt and json."""
    image, caption, prompt = generate_sample(index, seed, image_size)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"__key__": f"{index:09d}", "png": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(prompt).encode()}


def shard_pattern(out: str, num_shards: int) -> str:
    """Brace pattern of the shards written by write_shards."""
    return os.path.join(out, f"shapes-{{000000..{num_shards - 1:06d}}}.tar")


def write_shards(out: str, num_samples: int, shard_size: int = 1000, image_size: int = 32, seed: int = 0,
                 progress: bool = True) -> str:
    """Write `num_samples` samples into shards of `shard_size`; returns the brace pattern.

    Resumable per shard: a shard is written to a temporary name and renamed when complete; existing
    complete shards are kept (they are deterministic in (seed, index, image_size)).
    """
    import webdataset as wds
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    num_shards = (num_samples + shard_size - 1) // shard_size
    bar = tqdm(total=num_samples, unit="img", desc="shapes", disable=not progress, file=sys.stderr)
    for s in range(num_shards):
        path = os.path.join(out, f"shapes-{s:06d}.tar")
        lo, hi = s * shard_size, min(num_samples, (s + 1) * shard_size)
        if os.path.exists(path):
            bar.update(hi - lo)
            continue
        with wds.TarWriter(path + ".tmp", encoder=False, mtime=0) as sink:  # encoder=False: bytes only, no pickle
            for i in range(lo, hi):
                sink.write(encode_sample(i, seed, image_size))
                bar.update(1)
        os.replace(path + ".tmp", path)
    bar.close()
    with open(os.path.join(out, "shapes.json"), "w") as f:
        json.dump(dict(num_samples=num_samples, shard_size=shard_size, image_size=image_size, seed=seed,
                       shards=shard_pattern(out, num_shards), colors=COLORS, shapes=SHAPES, categories=CATEGORIES), f, indent=1)
    return shard_pattern(out, num_shards)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Generate the embedded shapes dataset (colored shapes + captions) as WebDataset shards "
        "shapes-NNNNNN.tar (png + txt + json). Deterministic in --seed; existing complete shards are kept.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=5000, help="number of samples (default 5000; millions are fine)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels, >= 24 (default 32)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for name, low in (("num_samples", 1), ("shard_size", 1), ("image_size", 24)):
        if getattr(a, name) < low:
            p.exit(2, f"error: --{name.replace('_', '-')} must be >= {low} (got {getattr(a, name)})\n")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.exit(2, f"error: --out {a.out} exists and is not a directory\n")
    pattern = write_shards(a.out, a.num_samples, a.shard_size, a.image_size, a.seed, progress=not a.no_progress)
    print(f"wrote {a.num_samples} samples: {pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
