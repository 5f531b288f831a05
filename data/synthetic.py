"""The embedded "shapes" dataset: procedurally drawn colored shapes with compositional captions.

Each sample is a small RGB image (default 32x32) with 1-4 objects on a light background and a caption that
states what the scorer (data/scorer.py) can check: count, color, shape and spatial relation, e.g.
"two red circles left of a blue square". Six prompt categories mirror GenEval: single_object,
two_objects, counting, colors, position, color_attr. Sample i depends only on (seed, i), so any range can
be generated independently and the set is deterministic. Written as WebDataset shards: png + txt + json.

Held-out compositions: by default (holdout=True) no sample ever shows a (color, shape) pair of
HELDOUT_PAIRS, neither stated in the caption nor drawn for a shape whose color the caption leaves open,
so `heldout_prompts` measures compositional generalisation (every color and every shape is still seen,
only these pairings are not); `training_prompts` gives in-distribution prompts for comparison.
`parse_caption` inverts `caption_of`.

CLI: python -m data.synthetic --out data/shapes --num-samples 5000 [--no-holdout] [--mix quickstart]
     [--image-size N] [--categories single_object,colors] [--object-size MIN,MAX] [--single-size MIN,MAX]
     [--count-layout scatter|cells]
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
CELL_MARGIN = 2  # px of a cell kept free along the centre lines (count_layout="cells"): objects of neighbouring
# cells are 2 * CELL_MARGIN apart
# (color, shape) pairs absent from the training set (holdout=True): one per shape, four different colors,
# so every color keeps >= 3 shapes and every shape 5 colors in training.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("purple", "square")})
# Categories whose captions state a color (the ones a held-out pair can be asked for in).
COLOR_CATEGORIES = ("colors", "counting", "color_attr", "position")
# Where a count's objects go (count_layout): "scatter", anywhere GAP apart; "cells", one object per cell of the
# image's 2x2 grid (cells drawn at random, each object jittered within its cell), so that the number of objects
# is the number of filled cells.
COUNT_LAYOUTS = ("scatter", "cells")
# Mix settings added after the first sets were written, with the value such a set has (its shapes.json lacks them).
LATER_SETTINGS = dict(single_size=None, count_layout="scatter")
# Named sets (--mix): image size, prompt categories, object side range (None: default_object_size), the side
# range of an image's only object (single_size; None: object_size) and the count layout.
# "quickstart" is the README main job's: 16 px images of one coloured object of 8-11 px or a count (2-4) of one
# kind of 5-6 px, one per cell: 64 tokens of 2x2 pixels; within the quickstart's 880 steps single objects that
# large are learnt and counts in cells half the time, scattered 5-7 px ones are not (README, the quickstart
# recipe).
# "study" is the routing study's (bench/study.py): every object 5-7 px, scattered.
# "paper-claims" is bench/paper_claims.py's, richer so that model capacity binds: 32 px, all six prompt
# categories (one object, two objects, counts of 2-4, colours, two-group relations, two coloured objects),
# objects of 6-10 px anywhere (the generator's own images score 1.00 strict; 5 px ones 0.82).
MIXES = {
    "standard": dict(image_size=32, categories=CATEGORIES, object_size=None, single_size=None, count_layout="scatter"),
    "quickstart": dict(image_size=16, categories=("colors", "counting"), object_size=(5, 6), single_size=(8, 11),
                       count_layout="cells"),
    "study": dict(image_size=16, categories=("colors", "counting"), object_size=(5, 7), single_size=None,
                  count_layout="scatter"),
    "paper-claims": dict(image_size=32, categories=CATEGORIES, object_size=(6, 10), single_size=None,
                         count_layout="scatter"),
}


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


def stated_heldout(prompt: dict) -> list[tuple[str, str]]:
    """The held-out (color, shape) pairs a prompt states (groups with a color only)."""
    return [(g["color"], g["shape"]) for g in prompt["groups"] if (g["color"], g["shape"]) in HELDOUT_PAIRS]


def free_colors(shape: str, holdout: bool = True) -> list[str]:
    """Colors that may be drawn for a `shape` whose color the caption leaves open."""
    return [c for c in COLORS if not (holdout and (c, shape) in HELDOUT_PAIRS)]


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


def default_object_size(image_size: int) -> tuple[int, int]:
    """Object side range in pixels (min, max) of the standard set: 7-11 px at 32 px, scaled."""
    return max(5, round(7 * image_size / 32)), max(6, round(11 * image_size / 32))


def _alone(prompt: dict) -> bool:
    """Whether a prompt asks for one object in all (drawn at single_size)."""
    return sum(g["count"] for g in prompt["groups"]) == 1


def _is_count(prompt: dict) -> bool:
    """Whether a prompt asks for a count of one kind (a lone group of 2 or more: what count_layout places)."""
    return len(prompt["groups"]) == 1 and prompt["groups"][0]["count"] > 1


def _cell_spans(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Usable pixels (first, last) of the low and the high cell along one axis: up to the image border, and
    CELL_MARGIN px short of the centre line, so that objects of neighbouring cells are two 2x2 patches apart
    (with GAP's 2 px a model's samples merged them)."""
    half = size // 2
    return (0, half - 1 - CELL_MARGIN), (half + CELL_MARGIN, size - 1)


def _cell_boxes(rng, count: int, size: int, smin: int, smax: int) -> list[tuple[int, int, int, int]] | None:
    """Boxes of `count` objects, one per cell of the 2x2 grid (cells drawn at random, size and offset within the
    cell too); None if an object is larger than a cell."""
    spans = _cell_spans(size)
    boxes = []
    for cell in rng.choice(4, count, replace=False):
        s = int(rng.integers(smin, smax + 1))
        (ax, bx), (ay, by) = spans[cell % 2], spans[cell // 2]
        if bx - ax + 1 < s or by - ay + 1 < s:
            return None
        x0, y0 = int(rng.integers(ax, bx - s + 2)), int(rng.integers(ay, by - s + 2))
        boxes.append((x0, y0, x0 + s - 1, y0 + s - 1))
    return boxes


def _colored(rng, group: dict, gi: int, box, holdout: bool) -> dict:
    """The object of `group` in `box`: its stated color, else one drawn from `free_colors`."""
    if group["color"] is None:
        free = free_colors(group["shape"], holdout)
        color = free[int(rng.integers(len(free)))]
    else:
        color = group["color"]
    return dict(shape=group["shape"], color=color, box=list(box), group=gi)


def _place(rng, prompt, size, holdout: bool = False, object_size: tuple[int, int] | None = None,
           single_size: tuple[int, int] | None = None, count_layout: str = "scatter") -> list[dict] | None:
    """Random non-overlapping boxes for every object (a count's in cells with count_layout="cells"); None if
    this draw failed (caller retries)."""
    smin, smax = (single_size if _alone(prompt) and single_size else object_size) or default_object_size(size)
    if count_layout == "cells" and _is_count(prompt):
        group = prompt["groups"][0]
        boxes = _cell_boxes(rng, group["count"], size, smin, smax)
        return None if boxes is None else [_colored(rng, group, 0, box, holdout) for box in boxes]
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
            objects.append(_colored(rng, g, gi, box, holdout))
    return objects


def _draw_prompt(rng: np.random.Generator, image_size: int, holdout: bool, categories: tuple[str, ...] = CATEGORIES,
                 object_size: tuple[int, int] | None = None, single_size: tuple[int, int] | None = None,
                 count_layout: str = "scatter") -> tuple[dict, list[dict]]:
    """(prompt, placed objects) of one sample: category uniform over `categories`; with `holdout` a prompt
    stating a held-out pair is redrawn within its category (so categories stay uniform) and open colors
    avoid them. holdout=False consumes the generator exactly as before held-out pairs existed."""
    while True:
        category = categories[int(rng.integers(len(categories)))]
        prompt = _prompt(rng, category)
        while holdout and stated_heldout(prompt):
            prompt = _prompt(rng, category)
        objects = _place(rng, prompt, image_size, holdout, object_size, single_size, count_layout)
        if objects is not None:
            return prompt, objects


def generate_sample(index: int, seed: int = 0, image_size: int = 32, holdout: bool = True,
                    categories: tuple[str, ...] = CATEGORIES,
                    object_size: tuple[int, int] | None = None, single_size: tuple[int, int] | None = None,
                    count_layout: str = "scatter") -> tuple[np.ndarray, str, dict]:
    """Sample `index` of the set: (image uint8 [H, W, 3], caption, prompt structure incl. objects).
    holdout=True: no object is a (color, shape) pair of HELDOUT_PAIRS. `categories`: the prompt mix
    (uniform over these); `object_size`: (min, max) object side in pixels (None: `default_object_size`);
    `single_size`: the same for an image's only object (None: `object_size`); `count_layout`: where a
    count's objects go (COUNT_LAYOUTS)."""
    rng = np.random.default_rng([seed, index])
    prompt, objects = _draw_prompt(rng, image_size, holdout, categories, object_size, single_size, count_layout)
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw(draw, o["shape"], tuple(o["box"]), COLORS[o["color"]])
    prompt = dict(prompt, objects=objects, index=index, seed=seed)
    return np.asarray(img), caption_of(prompt), prompt


def training_prompts(n: int, seed: int = 0, image_size: int = 32, categories: tuple[str, ...] = CATEGORIES,
                     object_size: tuple[int, int] | None = None, single_size: tuple[int, int] | None = None,
                     count_layout: str = "scatter") -> list[dict]:
    """`n` in-distribution prompt structures (category, groups, relation): drawn exactly as the training
    captions of a set with these settings are (held-out pairs excluded), from a random stream of their own
    (not samples 0..n-1)."""
    return [_strip(_draw_prompt(np.random.default_rng([seed, i, 1]), image_size, True, categories, object_size,
                                single_size, count_layout)[0])
            for i in range(n)]


def heldout_prompts(n: int, seed: int = 0, categories: tuple[str, ...] = CATEGORIES) -> list[dict]:
    """`n` prompt structures that each state a held-out (color, shape) pair: with the k color-stating
    categories among `categories` (COLOR_CATEGORIES order), prompt i asks for pair i // k % 4 (sorted) in
    the (i % k)-th of them, the rest of it drawn as in training (so the first 4k cover every pair in every
    such category). Deterministic in (n, seed, categories). ValueError if no category states a color."""
    pairs = sorted(HELDOUT_PAIRS)
    cats = [c for c in COLOR_CATEGORIES if c in categories]
    if not cats:
        raise ValueError(f"categories={','.join(categories)} state no color, so no prompt can ask for a held-out pair")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 2])
        category = cats[i % len(cats)]
        pair = pairs[(i // len(cats)) % len(pairs)]
        while True:  # rejection: about 1 in 12-24 draws states the wanted pair
            prompt = _prompt(rng, category)
            if pair in stated_heldout(prompt):
                break
        out.append(_strip(prompt))
    return out


def _strip(prompt: dict) -> dict:
    return dict(category=prompt["category"], groups=[dict(g) for g in prompt["groups"]], relation=prompt["relation"])


_NUMBER_WORDS = {w: n for n, w in NUMBERS.items()}


def _parse_phrase(words: list[str], caption: str) -> dict:
    bad = ValueError(f"caption {caption!r} does not parse: expected '<a|two|three|four> [color] <shape>' "
                     f"phrases joined by ' and ' or one of {', '.join(RELATIONS)}")
    if len(words) not in (2, 3) or words[0] not in _NUMBER_WORDS:
        raise bad
    count, color, noun = _NUMBER_WORDS[words[0]], (words[1] if len(words) == 3 else None), words[-1]
    if color is not None and color not in COLORS:
        raise bad
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if shape not in SHAPES or (count > 1) != (noun != shape):  # "two circle" / "a circles"
        raise bad
    return dict(count=count, color=color, shape=shape)


def parse_caption(text: str) -> dict:
    """The prompt structure (category, groups, relation) of a caption: the inverse of `caption_of`.
    Case and extra spaces are ignored; two phrases joined by " and " are color_attr when a color is stated
    (else two_objects). ValueError naming the caption when it is not in the grammar."""
    words = text.lower().split()
    relation, split = None, None
    for r in RELATIONS:
        rw = r.split()
        hits = [k for k in range(1, len(words) - len(rw)) if words[k:k + len(rw)] == rw]
        if hits:
            relation, split = r, (hits[0], hits[0] + len(rw))
            break
    if relation is None and "and" in words:
        k = words.index("and")
        split = (k, k + 1)
    if split is None:
        groups = [_parse_phrase(words, text)]
    else:
        groups = [_parse_phrase(words[:split[0]], text), _parse_phrase(words[split[1]:], text)]
    if len(groups) == 2 and (groups[0]["color"], groups[0]["shape"]) == (groups[1]["color"], groups[1]["shape"]):
        raise ValueError(f"caption {text!r} names the same object twice (write e.g. 'two circles')")
    if relation is not None:
        category = "position"
    elif len(groups) == 2:
        category = "color_attr" if any(g["color"] for g in groups) else "two_objects"
    elif groups[0]["count"] > 1:
        category = "counting"
    else:
        category = "colors" if groups[0]["color"] else "single_object"
    return dict(category=category, groups=groups, relation=relation)


def encode_sample(index: int, seed: int, image_size: int, holdout: bool = True,
                  categories: tuple[str, ...] = CATEGORIES, object_size: tuple[int, int] | None = None,
                  single_size: tuple[int, int] | None = None, count_layout: str = "scatter") -> dict:
    """One WebDataset sample: png (lossless, so colors stay exact), txt and json."""
    image, caption, prompt = generate_sample(index, seed, image_size, holdout, categories, object_size,
                                             single_size, count_layout)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"__key__": f"{index:09d}", "png": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(prompt).encode()}


def shard_pattern(out: str, num_shards: int) -> str:
    """Brace pattern of the shards written by write_shards."""
    return os.path.join(out, f"shapes-{{000000..{num_shards - 1:06d}}}.tar")


def check_mix(image_size: int, categories: tuple[str, ...] = CATEGORIES,
              object_size: tuple[int, int] | None = None, single_size: tuple[int, int] | None = None,
              count_layout: str = "scatter") -> None:
    """ValueError naming the setting when the categories, object sizes or count layout cannot make samples:
    an unknown category or layout, a bad size range, or objects too large to place a category's prompts at
    this image size (in a cell, for counts with count_layout="cells")."""
    if not categories or any(c not in CATEGORIES for c in categories):
        raise ValueError(f"categories={','.join(categories)} must be a non-empty subset of {','.join(CATEGORIES)}")
    if count_layout not in COUNT_LAYOUTS:
        raise ValueError(f"count_layout={count_layout} must be one of {', '.join(COUNT_LAYOUTS)}")
    for name, size in (("object_size", object_size), ("single_size", single_size)):
        if size is not None and not 3 <= size[0] <= size[1] < image_size:
            raise ValueError(f"{name}={size[0]},{size[1]} must satisfy 3 <= min <= max < image_size={image_size}")
    cell = min(last - first + 1 for first, last in _cell_spans(image_size))
    count_size = object_size or default_object_size(image_size)
    if count_layout == "cells" and "counting" in categories and count_size[1] > cell:
        raise ValueError(f"object_size={','.join(map(str, count_size))} does not fit a cell: count_layout=cells "
                         f"at image_size={image_size} fits objects of at most {cell} px")
    for category in categories:  # every prompt of a category must be placeable: check its worst case
        rng = np.random.default_rng(0)
        prompts = [_prompt(rng, category) for _ in range(200)]
        placed = sum(_place(rng, p, image_size, False, object_size, single_size, count_layout) is not None
                     for p in prompts)
        if placed < 20:
            alone = single_size is not None and all(_alone(p) for p in prompts)
            name, size = ("single_size", single_size) if alone else (
                "object_size", object_size or default_object_size(image_size))
            raise ValueError(f"{name}={','.join(map(str, size))} is too large for category {category} at "
                             f"image_size={image_size} ({placed}/200 prompts could be placed); use smaller objects")


def write_shards(out: str, num_samples: int, shard_size: int = 1000, image_size: int = 32, seed: int = 0,
                 progress: bool = True, holdout: bool = True, categories: tuple[str, ...] = CATEGORIES,
                 object_size: tuple[int, int] | None = None, single_size: tuple[int, int] | None = None,
                 count_layout: str = "scatter") -> str:
    """Write `num_samples` samples into shards of `shard_size`; returns the brace pattern.

    Resumable per shard: a shard is written to a temporary name and renamed when complete; existing
    complete shards are kept (they are deterministic in their settings: seed, image_size, holdout,
    categories, object_size, single_size, count_layout), so `out` must not hold shards written with other
    settings (checked against its shapes.json: ValueError). shapes.json records the settings and the
    `heldout_pairs` absent from the set; `read_mix` reads back what `training_prompts` needs.
    """
    import webdataset as wds
    from tqdm import tqdm

    check_mix(image_size, categories, object_size, single_size, count_layout)
    os.makedirs(out, exist_ok=True)
    num_shards = (num_samples + shard_size - 1) // shard_size
    meta_path = os.path.join(out, "shapes.json")
    settings = dict(shard_size=shard_size, image_size=image_size, seed=seed, holdout=holdout,
                    categories=list(categories), object_size=list(object_size or default_object_size(image_size)),
                    single_size=list(single_size) if single_size else None, count_layout=count_layout)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        old.setdefault("holdout", False)  # written before held-out pairs existed: the holdout=False content
        if "image_size" in old:
            old.update({k: list(v) if isinstance(v, tuple) else v for k, v in _recorded_mix(old).items()
                        if k != "image_size"})
        diff = [f"{k}={old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds shards written with {', '.join(diff)}; use another --out or delete it")
    meta = dict(num_samples=num_samples, **settings, heldout_pairs=sorted(HELDOUT_PAIRS) if holdout else [],
                shards=shard_pattern(out, num_shards), colors=COLORS, shapes=SHAPES)
    with open(meta_path, "w") as f:  # before the shards, so an interrupted run is checked on resume too
        json.dump(meta, f, indent=1)
    bar = tqdm(total=num_samples, unit="img", desc="shapes", disable=not progress, file=sys.stderr)
    for s in range(num_shards):
        path = os.path.join(out, f"shapes-{s:06d}.tar")
        lo, hi = s * shard_size, min(num_samples, (s + 1) * shard_size)
        if os.path.exists(path):
            bar.update(hi - lo)
            continue
        with wds.TarWriter(path + ".tmp", encoder=False, mtime=0) as sink:  # encoder=False: bytes only, no pickle
            for i in range(lo, hi):
                sink.write(encode_sample(i, seed, image_size, holdout, categories, object_size, single_size,
                                         count_layout))
                bar.update(1)
        os.replace(path + ".tmp", path)
    bar.close()
    return shard_pattern(out, num_shards)


def _recorded_mix(meta: dict) -> dict:
    """image_size, categories, object_size, single_size, count_layout of a shapes.json; sets written before
    a setting existed have the standard mix's value of it (LATER_SETTINGS)."""
    size = int(meta["image_size"])
    single = meta.get("single_size")
    return dict(image_size=size, categories=tuple(meta.get("categories", CATEGORIES)),
                object_size=tuple(meta.get("object_size", default_object_size(size))),
                single_size=tuple(single) if single else LATER_SETTINGS["single_size"],
                count_layout=meta.get("count_layout", LATER_SETTINGS["count_layout"]))


def read_mix(directory: str) -> dict:
    """The prompt settings of a set written by `write_shards` (its shapes.json): keyword arguments
    image_size, categories, object_size, single_size, count_layout for `training_prompts`. FileNotFoundError
    naming the file."""
    path = os.path.join(directory, "shapes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a shapes set written by python -m data.synthetic has one)")
    with open(path) as f:
        return _recorded_mix(json.load(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Generate the embedded shapes dataset (colored shapes + captions) as WebDataset shards "
        "shapes-NNNNNN.tar (png + txt + json). Deterministic in --seed; existing complete shards are kept.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=5000, help="number of samples (default 5000; millions are fine)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--mix", choices=tuple(MIXES), default="standard",
                   help="named set: the defaults of --image-size, --categories, --object-size, --single-size and "
                   "--count-layout ("
                   + "; ".join(f"{name}: {m['image_size']} px, {','.join(m['categories'])}, "
                               f"{'-'.join(map(str, m['object_size'] or default_object_size(m['image_size'])))} px objects"
                               + (f", {'-'.join(map(str, m['single_size']))} px alone" if m["single_size"] else "")
                               + f", counts {m['count_layout']}"
                               for name, m in MIXES.items()) + ")")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels, >= 16 (default: --mix's)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--no-holdout", action="store_true",
                   help="also draw the held-out (color, shape) pairs "
                   + ", ".join(" ".join(x) for x in sorted(HELDOUT_PAIRS))
                   + " (default: never in the set, for evaluating compositional generalisation)")
    p.add_argument("--categories", default=None,
                   help="comma-separated prompt categories, drawn uniformly, of " + ",".join(CATEGORIES)
                   + " (default: --mix's)")
    p.add_argument("--object-size", default=None, metavar="MIN,MAX",
                   help="object side range in pixels (default: --mix's; standard: 7,11 at 32 px, scaled "
                   "with --image-size)")
    p.add_argument("--single-size", default=None, metavar="MIN,MAX",
                   help="side range in pixels of an image's only object (default: --mix's; standard: --object-size)")
    p.add_argument("--count-layout", choices=COUNT_LAYOUTS, default=None,
                   help="where a count's objects go: scatter (anywhere) or cells (one per cell of the 2x2 grid) "
                   "(default: --mix's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    mix = MIXES[a.mix]
    if a.image_size is None:
        a.image_size = mix["image_size"]
    for name, low in (("num_samples", 1), ("shard_size", 1), ("image_size", 16)):
        if getattr(a, name) < low:
            p.exit(2, f"error: --{name.replace('_', '-')} must be >= {low} (got {getattr(a, name)})\n")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.exit(2, f"error: --out {a.out} exists and is not a directory\n")
    categories = mix["categories"] if a.categories is None else tuple(c.strip() for c in a.categories.split(",")
                                                                       if c.strip())
    sizes = {}
    for name in ("object_size", "single_size"):
        value = getattr(a, name)
        if value is None:
            sizes[name] = mix[name]
            continue
        try:
            lo, hi = (int(v) for v in value.split(","))
        except ValueError:
            p.exit(2, f"error: --{name.replace('_', '-')} {value!r} must be MIN,MAX (two integers)\n")
        sizes[name] = (lo, hi)
    count_layout = mix["count_layout"] if a.count_layout is None else a.count_layout
    try:
        check_mix(a.image_size, categories, **sizes, count_layout=count_layout)
    except ValueError as e:
        msg = str(e)
        flag = next((n for n in sizes if msg.startswith(n)), None)
        p.exit(2, f"error: --{flag.replace('_', '-') + msg[len(flag):] if flag else msg}\n")
    try:
        pattern = write_shards(a.out, a.num_samples, a.shard_size, a.image_size, a.seed, progress=not a.no_progress,
                               holdout=not a.no_holdout, categories=categories, **sizes,
                               count_layout=count_layout)
    except ValueError as e:
        p.exit(2, f"error: --out {e}\n")
    print(f"wrote {a.num_samples} samples: {pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
