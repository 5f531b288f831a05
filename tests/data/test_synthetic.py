"""Shapes generator: deterministic, captions agree with the drawn objects; scorer: high on truth, low otherwise."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data import scorer, synthetic
from data.synthetic import CATEGORIES, caption_of, generate_sample


def test_deterministic_by_seed_and_index():
    a, b = synthetic.encode_sample(7, 0, 32), synthetic.encode_sample(7, 0, 32)
    assert a == b
    assert synthetic.encode_sample(7, 1, 32)["png"] != a["png"]
    assert synthetic.encode_sample(8, 0, 32)["png"] != a["png"]


def test_captions_agree_with_drawn_objects():
    seen = set()
    for i in range(300):
        image, caption, p = generate_sample(i, 3, 32)
        seen.add(p["category"])
        assert caption == caption_of(p)
        assert len(p["objects"]) == sum(g["count"] for g in p["groups"]) <= 4
        for o in p["objects"]:
            g = p["groups"][o["group"]]
            assert o["shape"] == g["shape"] and (g["color"] is None or o["color"] == g["color"])
            x0, y0, x1, y1 = o["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2  # the center pixel of every shape is filled with its color
            assert tuple(image[cy, cx]) == synthetic.COLORS[o["color"]], (i, caption)
        if p["relation"]:
            a = [o for o in p["objects"] if o["group"] == 0]
            b = [o for o in p["objects"] if o["group"] == 1]
            axis = 0 if p["relation"] in ("left of", "right of") else 1
            first_low = p["relation"] in ("left of", "above")
            lo, hi = (a, b) if first_low else (b, a)
            assert max(o["box"][axis + 2] for o in lo) < min(o["box"][axis] for o in hi), caption
    assert seen == set(CATEGORIES)


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(i, 0, 32) for i in range(600)]


def test_scorer_high_on_ground_truth_low_on_shuffled(samples):
    images, prompts = [s[0] for s in samples], [s[2] for s in samples]
    truth = scorer.score_batch(images, prompts)
    assert truth["overall"] >= 0.95 and min(truth["per_category"].values()) >= 0.9, truth
    shuffled = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]  # every image gets another prompt
    wrong = scorer.score_batch(images, shuffled)
    assert wrong["overall"] <= 0.2, wrong


def test_scorer_catches_wrong_color_missing_object_and_mirrored_position(samples):
    pos = next(s for s in samples if s[2]["relation"] in ("left of", "right of"))
    image, _, p = pos
    assert scorer.score_image(image, p)[0]
    assert not scorer.score_image(image[:, ::-1].copy(), p)[0]  # mirrored: relation no longer holds
    one = next(s for s in samples if s[2]["category"] == "colors")
    image, _, p = one
    x0, y0, x1, y1 = p["objects"][0]["box"]
    other = next(c for c in synthetic.COLORS if c != p["objects"][0]["color"])
    recolored = image.copy()
    mask = (recolored[y0:y1 + 1, x0:x1 + 1] == synthetic.COLORS[p["objects"][0]["color"]]).all(-1)
    recolored[y0:y1 + 1, x0:x1 + 1][mask] = synthetic.COLORS[other]
    assert scorer.score_image(image, p)[0] and not scorer.score_image(recolored, p)[0]
    erased = image.copy()
    erased[y0:y1 + 1, x0:x1 + 1] = synthetic.BACKGROUND
    ok, reason = scorer.score_image(erased, p)
    assert not ok and "found 0 objects" in reason


def test_scorer_shape_classes_on_large_images():
    for i in range(200):
        image, _, p = generate_sample(i, 5, 64)
        assert scorer.score_image(image, p)[0], caption_of(p)


def test_cli_writes_shards_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    assert synthetic.main(["--out", str(out), "--num-samples", "25", "--shard-size", "10", "--no-progress"]) == 0
    shards = sorted(os.listdir(out))
    assert shards == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar", "shapes.json"]
    with tarfile.open(out / "shapes-000002.tar") as tf:
        names = tf.getnames()
        png = tf.extractfile("000000020.png").read()
    assert len(names) == 15 and "000000024.txt" in names
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), generate_sample(20, 0, 32)[0])
    assert "wrote 25 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(out), "--num-samples", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--num-samples" in err
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0 and "--image-size" in capsys.readouterr().out
