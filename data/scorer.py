"""Rule-based GenEval-like scorer for the shapes dataset: does a generated image match its prompt?

Pipeline (CPU, no downloads): pixels -> color by hue (saturated pixels only, so blending with the
background does not change the color) -> connected components per color -> shape from the component's
box fill ratio and row-width profile -> compare counts, colors, shapes and the relation of the two
groups' centroids with the prompt structure written by data/synthetic.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.synthetic import CATEGORIES, COLORS

MIN_SATURATION = 0.35  # below: background / gray
MIN_VALUE = 0.25  # below: too dark to have a reliable hue


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> hue in degrees, saturation, value (each [H, W])."""
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, sat, mx


_NAMES = list(COLORS)
_PALETTE_HUES = _hsv(np.array([list(COLORS.values())], dtype=np.uint8))[0][0]  # [6]


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (int [H, W]); -1 for background."""
    hue, sat, val = _hsv(image)
    d = np.abs(hue[..., None] - _PALETTE_HUES)  # [H, W, 6]
    d = np.minimum(d, 360 - d)
    lab = d.argmin(-1)
    return np.where((sat >= MIN_SATURATION) & (val >= MIN_VALUE), lab, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask [H, W], each as an int array of (y, x) pixels [N, 2]."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(np.array(pix))
    return out


def classify_shape(pix: np.ndarray) -> str:
    """Shape of one component from its pixels [N, 2]: fill ratio of its box, then row-width profile."""
    y0, x0 = pix.min(0)
    y1, x1 = pix.max(0)
    hgt, wid = y1 - y0 + 1, x1 - x0 + 1
    fill = len(pix) / float(hgt * wid)
    if fill >= 0.9:
        return "square"
    if fill >= 0.66:
        return "circle"
    widths = np.bincount(pix[:, 0] - y0, minlength=hgt).astype(float)  # [hgt] pixels per row
    third = max(1, hgt // 3)
    middle, bottom = widths[third:hgt - third].mean() if hgt > 2 * third else widths.mean(), widths[-third:].mean()
    return "triangle" if bottom > middle else "diamond"


@dataclass
class Detected:
    color: str
    shape: str
    area: int
    cy: float  # centroid row
    cx: float  # centroid column


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detected]:
    """Objects in an image (uint8 [H, W, 3]); components smaller than min_area pixels are noise."""
    h = image.shape[0]
    min_area = min_area if min_area is not None else max(4, round(8 * (h / 32) ** 2))
    labels = color_labels(image)
    found = []
    for ci, name in enumerate(_NAMES):
        for pix in components(labels == ci):
            if len(pix) >= min_area:
                cy, cx = pix.mean(0)
                found.append(Detected(name, classify_shape(pix), len(pix), float(cy), float(cx)))
    return found


def _relation_holds(a: list[Detected], b: list[Detected], relation: str) -> bool:
    ax, ay = np.mean([o.cx for o in a]), np.mean([o.cy for o in a])
    bx, by = np.mean([o.cx for o in b]), np.mean([o.cy for o in b])
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def score_image(image: np.ndarray, prompt: dict) -> tuple[bool, str]:
    """(correct, reason) for one image against its prompt structure (dict with groups, relation)."""
    objs = detect(image)
    total = sum(g["count"] for g in prompt["groups"])
    if len(objs) != total:
        return False, f"found {len(objs)} objects, expected {total}"
    members = []
    for g in prompt["groups"]:
        match = [o for o in objs if o.shape == g["shape"] and (g["color"] is None or o.color == g["color"])]
        if len(match) != g["count"]:
            return False, f"found {len(match)} x {g['color'] or ''} {g['shape']}, expected {g['count']}"
        members.append(match)
    if prompt.get("relation") and not _relation_holds(members[0], members[1], prompt["relation"]):
        return False, f"relation '{prompt['relation']}' does not hold"
    return True, "ok"


def summarize(categories, correct) -> dict:
    """GenEval-like summary of per-image results: accuracy per category and overall (mean of the
    categories present), n, and sample_accuracy (fraction of all images)."""
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for category, ok in zip(categories, correct):
        hits[category].append(bool(ok))
    per = {c: float(np.mean(v)) for c, v in hits.items() if v}
    n = sum(len(v) for v in hits.values())
    return dict(overall=float(np.mean(list(per.values()))) if per else 0.0, per_category=per, n=n,
                sample_accuracy=sum(sum(v) for v in hits.values()) / max(1, n))


def score_batch(images, prompts) -> dict:
    """GenEval-like summary (see `summarize`) of images (uint8 [H, W, 3] each) against their prompts."""
    prompts = list(prompts)
    return summarize([p["category"] for p in prompts],
                     [score_image(np.asarray(image), p)[0] for image, p in zip(images, prompts)])
