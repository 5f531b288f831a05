"""Rule-based GenEval-like scorer for the shapes dataset: does a generated image match its prompt?

Pipeline (CPU, no downloads): pixels -> color by hue (saturated pixels only, so blending with the
background does not change the color) -> connected components per color -> shape from the component's
box fill ratio and row-width profile -> compare counts, colors, shapes and the relation of the two
groups' centroids with the prompt structure written by data/synthetic.py.

Two scores. The strict one (`score_image`, GenEval-like) counts an image only if every object, count,
colour, shape and the relation are right. The per-attribute one (`attribute_credit`) gives partial credit
per stated attribute, so that partly-right models can be ranked: colour, shape, count and relation (the
position category's attribute), each in [0, 1] per image; an image's partial score is the mean of the
attributes its prompt states.

Calibration (600 generator samples at 32 px, tests/data/test_synthetic.py): the generator's own images
score 1.00 strict and 1.00 partial (every attribute 1.00). Images paired with another sample's prompt (a
model that draws clean objects but ignores the text) score 0.03 strict and 0.23 partial (colour 0.25, shape
0.34, count 0.10, relation 0.00): that is chance. A random model (uniform noise images) scores 0.00 strict
and 0.02 partial (colour 0.06): scattered pixels of one colour are too small or too sparse to count as
objects or as a coloured region. On the quickstart's and the study's sets (data/synthetic.py
MIXES["quickstart"] and MIXES["study"]: 16 px, colors and counting prompts) the generator's images score
1.00 / 1.00 and shuffled captions 0.02 strict and 0.14 partial (quickstart: colour 0.15, shape 0.26, count
0.02) or 0.16 partial (study: colour 0.17, shape 0.29, count 0.04).
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


MIN_FILL = 0.45  # of its box: the generator's shapes fill >= 0.5; scattered same-colour pixels fill less


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detected]:
    """Objects in an image (uint8 [H, W, 3]). Components smaller than min_area pixels (default 16 at 32 px,
    scaled with the image area; the generator's smallest object has 25) or filling less than MIN_FILL of
    their box are noise."""
    h = image.shape[0]
    min_area = min_area if min_area is not None else max(4, round(16 * (h / 32) ** 2))
    labels = color_labels(image)
    found = []
    for ci, name in enumerate(_NAMES):
        for pix in components(labels == ci):
            box = (pix.max(0) - pix.min(0) + 1).prod()
            if len(pix) >= min_area and len(pix) >= MIN_FILL * box:
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


ATTRIBUTES = ("color", "shape", "count", "relation")


def _members(objs: list[Detected], group: dict) -> list[Detected]:
    """The objects of a prompt group: its shape, and its colour when one is stated."""
    return [o for o in objs if o.shape == group["shape"] and (group["color"] is None or o.color == group["color"])]


def _color_present(image: np.ndarray, color: str) -> bool:
    """Some connected region of `color` is as large as an object, whatever its shape (so a blurry or
    fragmented drawing in the right colour counts; scattered pixels do not)."""
    min_area = max(4, round(16 * (image.shape[0] / 32) ** 2))
    return any(len(pix) >= min_area for pix in components(color_labels(image) == _NAMES.index(color)))


def attribute_credit(image: np.ndarray, prompt: dict) -> dict[str, float | None]:
    """Partial credit per attribute in [0, 1] (None where the prompt states none): color, the share of the
    stated colours that the image shows (`_color_present`: the region need not be a clean object); shape, the share of the groups whose shape some object has (any colour);
    count, the share of the groups with exactly their count of objects (of their shape and stated colour);
    relation, whether those objects of the two groups stand in the stated relation."""
    objs, groups = detect(image), prompt["groups"]
    colors = sorted({g["color"] for g in groups if g["color"]})
    credit: dict[str, float | None] = {
        "color": float(np.mean([_color_present(image, c) for c in colors])) if colors else None,
        "shape": float(np.mean([any(o.shape == g["shape"] for o in objs) for g in groups])),
        "count": float(np.mean([len(_members(objs, g)) == g["count"] for g in groups])),
        "relation": None,
    }
    if prompt.get("relation"):
        a, b = _members(objs, groups[0]), _members(objs, groups[1])
        credit["relation"] = float(bool(a and b) and _relation_holds(a, b, prompt["relation"]))
    return credit


def partial_score(credit: dict[str, float | None]) -> float:
    """One image's partial score: the mean of the attributes its prompt states."""
    return float(np.mean([v for v in credit.values() if v is not None]))


def summarize_attributes(categories, credits) -> dict:
    """Per-attribute summary: the mean credit of each attribute over the images that state it ("attributes"),
    the mean partial score per category ("partial_per_category") and over the categories present
    ("partial_overall")."""
    credits = list(credits)
    attrs = {a: float(np.mean(vals)) for a in ATTRIBUTES
             if (vals := [c[a] for c in credits if c[a] is not None])}
    per: dict[str, list[float]] = {}
    for category, c in zip(categories, credits):
        per.setdefault(category, []).append(partial_score(c))
    per_category = {c: float(np.mean(v)) for c, v in per.items()}
    return dict(attributes=attrs, partial_per_category=per_category,
                partial_overall=float(np.mean(list(per_category.values()))) if per_category else 0.0)


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
    """Strict (`summarize`) and per-attribute (`summarize_attributes`) summaries of images (uint8 [H, W, 3]
    each) against their prompts."""
    images, prompts = [np.asarray(image) for image in images], list(prompts)
    categories = [p["category"] for p in prompts]
    return dict(summarize(categories, [score_image(image, p)[0] for image, p in zip(images, prompts)]),
                **summarize_attributes(categories, [attribute_credit(image, p) for image, p in zip(images, prompts)]))
