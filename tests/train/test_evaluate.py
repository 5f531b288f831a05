"""Evaluation: the scoring path separates matching from mismatched prompts, `evaluate` pairs every image
with its own prompt (a VAE that decodes to ground truth scores 1.0, shifted by one image it does not), the
CLI end to end on a tiny checkpoint (held-out / train / file prompts, eval.json consistent, FID skipped or
run through torch-fidelity's API), and one-line errors naming the bad option."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data.encoders import PixelVAE
from data.scorer import score_batch
from data.synthetic import (COLOR_CATEGORIES, caption_of, generate_sample, heldout_prompts, stated_heldout,
                            training_prompts, write_shards)
from tests.model.helpers import tiny_model
from tests.train.helpers import FakeText, save_tiny_checkpoints
from train.evaluate import compute_fid, evaluate, main, read_prompt_file, score_images
from train.generate import SampleError

ROOT = Path(__file__).resolve().parents[2]


def _as_tensor(images_uint8):
    """uint8 [H, W, 3] arrays -> [N, 3, H, W] in [-1, 1] (what a VAE decodes to)."""
    return torch.from_numpy(np.stack(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def truth():
    """Ground-truth samples without holdout (so held-out compositions are among them)."""
    return [generate_sample(i, 4, 32, holdout=False) for i in range(240)]


def test_score_images_discriminates_matching_from_mismatched_prompts(truth):
    images, prompts = [s[0] for s in truth], [s[2] for s in truth]
    right = score_images(_as_tensor(images), prompts)
    assert right["overall"] == 1.0 and right["n"] == 240, [r for r in right["results"] if not r["correct"]][:3]
    assert all(r["correct"] and r["reason"] == "ok" and r["partial"] == 1.0 for r in right["results"])
    own = score_batch(images, prompts)  # the scorer's own summaries
    assert right["per_category"] == own["per_category"] and right["attributes"] == own["attributes"]
    assert right["partial_overall"] == 1.0
    wrong = score_images(images, prompts[1:] + prompts[:1])  # uint8 arrays, every image with another prompt
    assert wrong["overall"] <= 0.2 and wrong["sample_accuracy"] <= 0.2, wrong["per_category"]
    assert wrong["partial_overall"] <= 0.4, wrong["attributes"]
    assert all(r["reason"] != "ok" for r in wrong["results"] if not r["correct"])
    # held-out compositions are scored like any other: ground truth drawn for them is correct
    held = [i for i, p in enumerate(prompts) if stated_heldout(p)]
    assert len(held) >= 10 and all(right["results"][i]["correct"] for i in held)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        score_images(images[:3], prompts[:2])


class TruthVAE:
    """Decodes (ignoring the latents) to the next images of a fixed queue: a "perfect model" whose
    outputs are the ground truth in generation order."""

    def __init__(self, images_NCHW):
        self.queue = list(images_NCHW)

    def decode(self, latents_BCHW):
        out = [self.queue.pop(0) for _ in range(latents_BCHW.shape[0])]
        return torch.stack(out)


def test_evaluate_pairs_each_image_with_its_prompt(truth):
    model, _ = tiny_model("tiny-ec", in_channels=3)  # fp64, 8x8 latents, text_dim 32
    samples = truth[:6]
    prompts = [s[2] for s in samples]
    gt = _as_tensor([s[0] for s in samples])
    expected = gt.repeat_interleave(2, 0)  # 2 samples per prompt, prompt-major
    r = evaluate(model, FakeText(), TruthVAE(expected), prompts, samples_per_prompt=2, steps=1, batch_size=4)
    assert r["overall"] == r["sample_accuracy"] == 1.0 and r["n"] == 12
    assert [(x["prompt"], x["sample"], x["noise_index"]) for x in r["results"]] == \
        [(i // 2, i % 2, i) for i in range(12)]
    assert [x["caption"] for x in r["results"]] == [caption_of(p) for p in prompts for _ in range(2)]
    assert torch.equal(r["images"], expected)
    shifted = torch.roll(expected, 2, 0)  # every prompt gets its neighbour's images
    r = evaluate(model, FakeText(), TruthVAE(shifted), prompts, samples_per_prompt=2, steps=1, batch_size=4)
    assert r["sample_accuracy"] <= 0.2


def test_evaluate_with_a_real_model_is_consistent():
    model, _ = tiny_model("tiny-ec", in_channels=3)
    prompts = heldout_prompts(4)
    r = evaluate(model, FakeText(), PixelVAE(), prompts, samples_per_prompt=2, steps=2, batch_size=3)
    assert r["images"].shape == (8, 3, 8, 8) and r["n"] == 8
    assert (r["images"][0] - r["images"][1]).abs().max() > 1e-3  # the two samples of a prompt: other noise
    assert set(r["per_category"]) == set(COLOR_CATEGORIES)
    assert r["sample_accuracy"] == np.mean([x["correct"] for x in r["results"]]) == r["heldout_accuracy"]
    assert r["overall"] == pytest.approx(np.mean(list(r["per_category"].values())))
    assert score_batch(list(r["images"].add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()),
                       [p for p in prompts for _ in range(2)])["per_category"] == r["per_category"]
    with pytest.raises(SampleError, match="samples_per_prompt=0"):
        evaluate(model, FakeText(), PixelVAE(), prompts, samples_per_prompt=0)


def test_read_prompt_file(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# held out\na red triangle\n\n  two Blue circles left of a square \n")
    assert [caption_of(p) for p in read_prompt_file(txt)] == ["a red triangle", "two blue circles left of a square"]
    jl = tmp_path / "p.jsonl"
    structs = heldout_prompts(3) + training_prompts(2)
    jl.write_text("\n".join(json.dumps(p) for p in structs) + '\n{"caption": "a cyan diamond"}\n')
    assert read_prompt_file(jl) == structs + [dict(category="colors", relation=None,
                                                   groups=[dict(count=1, color="cyan", shape="diamond")])]


# ---- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_tiny_checkpoints(tmp_path_factory.mktemp("eval_cli"))
    pngs = root / "real_png"
    pngs.mkdir()
    for i in range(6):
        Image.fromarray(generate_sample(i, 0, 32)[0]).save(pngs / f"{i}.png")
    pattern = write_shards(str(root / "real_shards"), 12, 6, 32, seed=0, progress=False)
    (root / "weights.pth").write_bytes(b"not really inception")
    return SimpleNamespace(root=root, ckpt=str(root / "ckpt"), pngs=str(pngs), shards=pattern,
                           weights=str(root / "weights.pth"))


def _eval(capsys, *argv):
    rc = main([*argv, "--steps", "2", "--batch-size", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_cli_heldout_default_and_fid_skipped(saved, tmp_path, capsys):
    out = _eval(capsys, "--checkpoint", saved.ckpt, "--num-prompts", "4", "--samples-per-prompt", "2",
                "--out", str(tmp_path), "--fid-real", saved.pngs)
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert rep["prompts"] == "held-out compositions" and rep["num_prompts"] == 4 and rep["samples_per_prompt"] == 2
    assert rep["n"] == 8 == len(rep["results"]) and set(rep["per_category"]) == set(COLOR_CATEGORIES)
    assert 0.0 <= rep["overall"] <= 1.0 and rep["overall"] == pytest.approx(np.mean(list(rep["per_category"].values())))
    assert rep["sample_accuracy"] == np.mean([x["correct"] for x in rep["results"]])
    assert [x["caption"] for x in rep["results"]] == [caption_of(p) for p in heldout_prompts(4) for _ in range(2)]
    assert all(x["heldout"] and x["reason"] for x in rep["results"])
    assert rep["checkpoint"].endswith("step_00000002") and rep["settings"]["steps"] == 2
    assert rep["settings"]["split"] == "heldout" and rep["settings"]["data"]["vae"] == "pixel"
    assert {"load_s", "generate_s", "score_s", "total_s", "images_per_s"} <= set(rep["timing"])
    assert rep["fid"] is None and "--inception-weights" in rep["fid_skipped"]
    assert "FID skipped: no --inception-weights given" in out and "[sample] 8/8" in out
    assert Image.open(tmp_path / "grid.png").width >= 8 * 8 * 3


def test_cli_train_split_prompt_file_and_fid_through_torch_fidelity(saved, tmp_path, capsys, monkeypatch):
    _eval(capsys, "--checkpoint", saved.ckpt, "--split", "train", "--num-prompts", "6", "--prompt-seed", "3",
          "--out", str(tmp_path / "train"))
    rep = json.loads((tmp_path / "train" / "eval.json").read_text())
    assert rep["prompts"] == "in-distribution prompts" and rep["n"] == 6
    assert [x["caption"] for x in rep["results"]] == [caption_of(p) for p in training_prompts(6, 3)]
    assert set(rep["per_category"]) == {p["category"] for p in training_prompts(6, 3)}

    calls = []

    def calculate_metrics(**kw):
        calls.append(kw)
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setitem(sys.modules, "torch_fidelity", SimpleNamespace(calculate_metrics=calculate_metrics))
    (tmp_path / "p.txt").write_text("a purple square\ntwo red triangles above a cyan circle\na circle and a square\n")
    out = _eval(capsys, "--checkpoint", str(saved.root / "export"), "--prompt-file", str(tmp_path / "p.txt"),
                "--out", str(tmp_path / "file"), "--fid-real", saved.shards, "--inception-weights", saved.weights)
    rep = json.loads((tmp_path / "file" / "eval.json").read_text())
    assert [x["caption"] for x in rep["results"]] == (tmp_path / "p.txt").read_text().splitlines()
    assert set(rep["per_category"]) == {"colors", "position", "two_objects"} and rep["settings"]["split"] is None
    assert [x["heldout"] for x in rep["results"]] == [True, True, False]
    assert rep["fid"] == 12.5 and rep["fid_backend"] == "torch-fidelity" and rep["fid_skipped"] is None
    assert "FID 12.50" in out and len(calls) == 1
    kw = calls[0]
    assert kw["fid"] and kw["feature_extractor_weights_path"] == saved.weights and not kw["cuda"]
    fake, real = kw["input1"], kw["input2"]
    assert len(fake) == 3 and len(real) == 12  # all 12 images of the 2 shards
    assert fake[0].dtype == real[0].dtype == torch.uint8 and fake[0].shape == real[0].shape == (3, 8, 8)  # resized

    def broken(**kw):
        raise RuntimeError("weights are not an Inception-v3 state dict\nmore detail")

    monkeypatch.setitem(sys.modules, "torch_fidelity", SimpleNamespace(calculate_metrics=broken))
    out = _eval(capsys, "--checkpoint", saved.ckpt, "--num-prompts", "2", "--out", str(tmp_path / "broken"),
                "--fid-real", saved.pngs, "--inception-weights", saved.weights)
    rep = json.loads((tmp_path / "broken" / "eval.json").read_text())  # the accuracy results are still written
    assert rep["fid"] is None and rep["n"] == 2
    assert rep["fid_skipped"] == "failed: RuntimeError: weights are not an Inception-v3 state dict"
    assert "FID skipped: failed: RuntimeError" in out


def test_compute_fid_skips_without_the_libraries(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    fid, why = compute_fid(x, x, "w.pth")
    assert fid is None and "neither torch-fidelity nor torchmetrics" in why


def test_cli_bad_input_fails_with_one_line(saved, tmp_path, capsys):
    ck = saved.ckpt
    (tmp_path / "bad.txt").write_text("a red circle\na pink circle\n")
    (tmp_path / "bad.jsonl").write_text('{"groups": [{"count": 9, "color": null, "shape": "circle"}]}\n')
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "--checkpoint"),
        (["--checkpoint", ck, "--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file"),
        (["--checkpoint", ck, "--prompt-file", str(tmp_path / "bad.txt")], "line 2: caption 'a pink circle'"),
        (["--checkpoint", ck, "--prompt-file", str(tmp_path / "bad.jsonl")], "bad.jsonl line 1"),
        (["--checkpoint", ck, "--prompt-file", str(tmp_path / "empty.txt")], "no prompts"),
        (["--checkpoint", ck, "--num-prompts", "0"], "--num-prompts=0"),
        (["--checkpoint", ck, "--samples-per-prompt", "0"], "--samples-per-prompt=0"),
        (["--checkpoint", ck, "--group-size", "64"], "--group-size"),
        (["--checkpoint", ck, "--dynamic-multiplier", "1.5"], "--dynamic-multiplier"),
        (["--checkpoint", ck, "--fid-real", str(tmp_path / "no_dir")], "--fid-real"),
        (["--checkpoint", ck, "--fid-real", str(tmp_path / "s-{0..1}.tar")], "--fid-real"),
        (["--checkpoint", ck, "--fid-real", str(tmp_path)], "holds no .png/.jpg images"),
        (["--checkpoint", ck, "--inception-weights", str(tmp_path / "w.pth")], "--inception-weights"),
        (["--checkpoint", ck, "--device", "tpu9"], "--device"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, (argv, err)
    for argv, needle in ((["--routing", "experts"], "--routing"), (["--split", "val"], "--split")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", ck, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", str(tmp_path / "nope")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --checkpoint {tmp_path / 'nope'} does not exist"]
