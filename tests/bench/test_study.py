"""The routing study pipeline end to end on a tiny config: dense and EC over two seeds through the Hydra
trainer, evaluation in every inference mode, the seed summary, Fig. 6b and the plots; a second invocation
for one run retrains and re-evaluates nothing and still reports every cached run (the full study is a
benchmark)."""

import json

import numpy as np
import pytest
from PIL import Image

from bench import study
from data.synthetic import MIXES

TINY = ["model.depth=4", "model.dim=32", "model.heads=2", "model.kv_heads=1", "data.batch_size=4",
        "data.shuffle_buffer=50", "train.log_every=1", "train.ckpt_every=3", "train.sample_steps=1",
        "train.sample_prompts=[a red circle]"]
ARGS = ["--steps", "3", "--prompts", "4", "--val-images", "8", "--sample-steps", "2", "--data-samples", "64",
        "--shard-size", "32"]


def _run_files(out):
    """(path -> mtime) of every run's checkpoint files and eval.json, (path -> size) of its train.log."""
    mtimes = {str(p): p.stat().st_mtime_ns for p in out.glob("study-*-s*/checkpoints/**/*") if p.is_file()}
    mtimes.update({str(p): p.stat().st_mtime_ns for p in out.glob("study-*-s*/eval.json")})
    return mtimes, {str(p): p.stat().st_size for p in out.glob("study-*-s*/train.log")}


@pytest.mark.slow
def test_study_trains_seeds_reports_spread_and_reuses_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--variants", "dense", "ec", "--seeds", "0", "1", *ARGS, *TINY]) == 0
    runs = {f"{v}-s{s}" for v in ("dense", "ec") for s in (0, 1)}
    for run in runs:
        assert (out / f"study-{run}" / "checkpoints" / "step_00000003" / "meta.json").is_file(), run
    meta = json.loads((out / "shapes-study" / "shapes.json").read_text())
    assert (meta["image_size"], meta["object_size"]) == (16, [5, 7])
    assert meta["categories"] == list(MIXES["study"]["categories"]) and meta["single_size"] is None
    for name in ("loss.png", "load.png", "heatmap.png", "samples.png", "experts_vs_t.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 100, name

    report = json.loads((out / "study.json").read_text())
    assert set(report["runs"]) == runs
    assert report["recipe"]["ema_decay"] == 0.99 and report["recipe"]["patch_size"] == 2
    summary = report["summary"]
    assert list(summary) == ["dense", "ec"]
    for v, e in summary.items():
        assert e["seeds"] == [0, 1] and e["n"] == 2
        loss = e["final_loss"]
        assert loss["n"] == 2 and loss["min"] <= loss["mean"] <= loss["max"]
        assert loss["values"][0] != loss["values"][1], "the two seeds trained the same run"
        for figs in e["modes"].values():
            assert figs["val_loss"]["n"] == 2 and np.isfinite(figs["val_loss"]["mean"])
            assert 0.0 <= figs["strict_in"]["min"] <= figs["strict_in"]["max"] <= 1.0
            assert 0.0 <= figs["partial_heldout"]["mean"] <= 1.0
            assert figs["color_heldout"]["n"] == 2 and figs["count_heldout"]["n"] == 2
    assert set(summary["dense"]["modes"]) == {"per_sample"} and set(summary["ec"]["modes"]) == set(study.MODES)
    assert summary["dense"]["steps_to_dense"]["n"] == 2  # every dense run reaches its own final loss
    for r in report["runs"].values():
        assert r["modes"]["per_sample"]["scorer_train"]["n"] == r["modes"]["per_sample"]["scorer_heldout"]["n"] == 4
    # Expert choice runs exactly f_c = 2 experts per token in its fixed modes: the dense model's FLOPs.
    ec_group = report["runs"]["ec-s0"]["modes"]["group"]
    assert ec_group["experts_per_token"] == [2.0, 2.0]
    assert ec_group["gflops_per_image"] == pytest.approx(
        report["runs"]["dense-s0"]["modes"]["per_sample"]["gflops_per_image"], rel=0.01)

    # Fig. 6b: per MoE layer and t the mean and std over tokens; EC's fixed modes hold the mean at f_c.
    assert summary["dense"]["experts_vs_t"] == {}
    curves = summary["ec"]["experts_vs_t"]
    assert set(curves) == set(study.MODES)
    for mode, curve in curves.items():
        assert curve["t"] == list(study.T_VALUES) and curve["layers"] == ["block 2", "block 4"]
        assert np.shape(curve["mean_LT"]) == np.shape(curve["std_LT"]) == (2, len(study.T_VALUES))
        assert np.all(np.asarray(curve["std_LT"]) >= 0)
    for run in ("ec-s0", "ec-s1"):
        for mode in ("group", "per_sample"):
            assert np.allclose(report["runs"][run]["experts_vs_t"][mode]["mean_LT"], 2.0, atol=1e-6, rtol=0)
    assert np.all(np.asarray(curves["dynamic"]["mean_LT"]) > 0)

    md = (out / "study.md").read_text()
    for label in (study.LABELS["dense"], study.LABELS["ec"]):
        assert label in md
    assert "mean [min, max] over the n seeds" in md and "| 2 |" in md
    assert ("nothing is claimed" in md) != bool(report["claims"])
    assert "t=0.05" in md and "t=0.95" in md

    # Another session: one run again. Nothing is retrained or re-evaluated; the report still has all four.
    before = _run_files(out)
    assert study.main(["--out", str(out), "--variants", "ec", "--seeds", "1", *ARGS, *TINY]) == 0
    assert _run_files(out) == before
    again = json.loads((out / "study.json").read_text())
    assert set(again["runs"]) == runs and again["summary"]["ec"]["n"] == 2
    assert again["summary"]["ec"]["final_loss"] == summary["ec"]["final_loss"]


def _entry(final, val):
    """A summary entry with these final losses and validation losses (in every mode) over seeds."""
    figs = {k: study.spread(val if k == "val_loss" else [0.5] * len(val)) for k in study.CLAIMED_MODE_FIGURES}
    return {"final_loss": study.spread(final), "modes": {m: figs for m in study.MODES}}


def test_claims_need_disjoint_min_max_intervals_and_two_seeds():
    summary = {"dense": _entry([1.0, 1.1], [0.60, 0.70]), "ec": _entry([0.8, 0.9], [0.55, 0.62]),
               "tc": _entry([0.1], [0.1])}
    summary["dense"]["modes"] = {"per_sample": summary["dense"]["modes"]["per_sample"]}
    assert summary["ec"]["final_loss"] == {"mean": pytest.approx(0.85), "min": 0.8, "max": 0.9,
                                           "std": pytest.approx(0.05), "n": 2, "values": [0.8, 0.9]}
    claimed = study.claims(summary)
    assert claimed == ["final train loss: ec 0.8500 [0.8000, 0.9000] < dense 1.0500 [1.0000, 1.1000]"]
    summary["ec"]["final_loss"] = study.spread([0.8, 1.0])  # touches dense's interval: no claim
    assert study.claims(summary) == []


def test_steps_to_dense_against_the_same_seed_and_the_mean():
    steps = np.arange(1, 6)
    losses = {("dense", 0): [5, 4, 3, 2, 1], ("dense", 1): [5, 4, 3, 3, 3], ("ec", 0): [5, 1, 1, 1, 1],
              ("ec", 1): [5, 4, 4, 4, 4]}
    curves = {run: (steps, np.array(x, dtype=float), {}) for run, x in losses.items()}
    figs = study.training_figures(curves, window=1)
    assert figs[("dense", 0)] == {"final_loss": 1.0, "steps_to_dense": 5, "steps_to_dense_mean": 4}
    assert figs[("ec", 0)] == {"final_loss": 1.0, "steps_to_dense": 2, "steps_to_dense_mean": 2}
    assert figs[("ec", 1)] == {"final_loss": 4.0, "steps_to_dense": None, "steps_to_dense_mean": None}
    assert study.spread([figs[("ec", s)]["steps_to_dense"] for s in (0, 1)])["n"] == 1


def test_batches_that_group_mode_cannot_route_stop_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--val-images: a batch of 12 images x 64 tokens of study-ec"):
        study.main(["--out", str(tmp_path), "--variants", "ec", "--val-images", "12", "--data-samples", "32",
                    "--shard-size", "32"])
    assert not list(tmp_path.glob("study-*"))
