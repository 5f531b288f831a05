"""Shards in img2dataset's layout ({key}.jpg, {key}.txt, {key}.json; keys shard*10^4 + i), with the
faults of a web crawl, for tests and benchmarks: JPEGs of shapes scenes with photo-like noise (so that
256-px files weigh ~15-30 KB, as crawled images do), and a chosen fraction of bad samples (undecodable
image bytes, or an empty caption), decided per sample by the seed.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from data.synthetic import generate_sample

FAULTS = ("image", "caption")  # the reasons data/shards.py counts them under


def web_sample(shard: int, index: int, size: int, seed: int, fault: str | None = None) -> dict:
    """One img2dataset sample; `fault` in FAULTS makes it bad in that way."""
    key = f"{shard * 10_000 + index:09d}"
    rng = np.random.default_rng([seed, shard, index])
    image, caption, _ = generate_sample(shard * 10_000 + index, seed, 32)
    up = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.float32)
    noisy = np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue() if fault != "image" else buf.getvalue()[:200] + bytes(rng.integers(0, 256, 200, dtype=np.uint8))
    meta = dict(url=f"https://example.com/{key}.jpg", caption=caption, key=key, status="success",
                width=size, height=size, original_width=size, original_height=size)
    return {"__key__": key, "jpg": jpg, "txt": b"" if fault == "caption" else caption.encode(),
            "json": json.dumps(meta).encode()}


def write_web_shards(out: str, num_shards: int, per_shard: int, size: int = 256, bad_fraction: float = 0.0,
                     seed: int = 0) -> tuple[str, dict]:
    """Write the shards; returns their brace pattern and {"good": keys, "bad": {reason: count}}."""
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    good, bad = set(), {}
    for s in range(num_shards):
        with wds.TarWriter(os.path.join(out, f"{s:05d}.tar"), encoder=False) as w:
            for i in range(per_shard):
                fault = FAULTS[rng.integers(len(FAULTS))] if rng.random() < bad_fraction else None
                sample = web_sample(s, i, size, seed, fault)
                w.write(sample)
                if fault is None:
                    good.add(sample["__key__"])
                else:
                    bad[fault] = bad.get(fault, 0) + 1
    return os.path.join(out, f"{{00000..{num_shards - 1:05d}}}.tar"), dict(good=good, bad=bad)
