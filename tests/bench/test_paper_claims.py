"""The paper-claims study (bench/paper_claims.py) end to end on tiny settings: every arm trains 2 steps through
the trainer (in this process, for speed), is evaluated and lands in the record with the model its arm names;
a rerun through bench/study.py --preset paper-claims retrains nothing. The verdicts' rule is checked on
hand-made spreads."""

import json

import numpy as np
import pytest

from bench import paper_claims as pc
from bench import study

TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.kv_heads=1", "data.batch_size=4",
        "data.shuffle_buffer=50", "train.log_every=1", "train.ckpt_every=2", "train.sample_steps=1",
        "train.sample_prompts=[a red circle]"]
ARGS = ["--steps", "2", "--seeds", "0", "--prompts", "2", "--val-images", "8", "--sample-steps", "1",
        "--batch-size", "4", "--data-samples", "64", "--shard-size", "32", "--in-process"]


def test_every_arm_trains_and_lands_in_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "pc"
    assert pc.main(["--out", str(out), *ARGS, *TINY]) == 0
    record = json.loads((out / "paper_claims.json").read_text())
    arms = record["arms"]
    assert set(arms) == set(pc.ARMS) and record["missing_runs"] == []
    for arm, e in arms.items():
        assert e["model"] == f"pc-{arm}", arm
        run = e["seeds"]["0"]
        assert np.isfinite(run["val_loss"]) and [s for s, _ in run["loss_curve"]] == [1, 2], arm
        assert "steps_to_dense_final" in run and run["scorer"]["heldout"]["n"] == run["scorer"]["in"]["n"] == 2
    # Each arm is the model it says: widths, experts, router.
    base = arms["dense"]["ffn_dims"]
    assert arms["dense-wide"]["ffn_dims"] == [2 * f for f in base]
    assert arms["dense-eq"]["ffn_dims"] == [f * (2 if i % 2 else 1) for i, f in enumerate(base)]
    for arm, (experts, router) in {"ec-8e": (8, "expert_choice"), "ec-16e": (16, "expert_choice"),
                                   "ec-32e": (32, "expert_choice"), "tc-8e": (8, "token_choice")}.items():
        assert (arms[arm]["num_experts"], arms[arm]["router"], arms[arm]["routing"]) == (experts, router, "tokens")
    for arm in ("dense", "dense-wide", "dense-eq"):
        assert arms[arm]["num_experts"] is None and arms[arm]["routing"] == "sample"
    assert arms["ec-8e"]["params"] < arms["ec-16e"]["params"] < arms["ec-32e"]["params"]
    assert set(record["verdicts"]) == set(pc.VERDICTS)
    assert all(v["value"] is None for v in record["verdicts"].values())  # one seed: no interval
    md = (out / "paper_claims.md").read_text()
    assert all(f"| {arm} |" in md for arm in pc.ARMS)
    for name in ("loss", "val", "samples", "heatmap", "experts_vs_t"):
        assert (out / f"paper_claims_{name}.png").is_file(), name

    ckpts = {str(p): p.stat().st_mtime_ns for p in out.glob("pc-*-s0/checkpoints/**/*") if p.is_file()}
    evals = {str(p): p.stat().st_mtime_ns for p in out.glob("pc-*-s0/pc_eval.json")}
    assert len(evals) == len(pc.ARMS)
    assert study.main(["--preset", "paper-claims", "--out", str(out), *ARGS, *TINY]) == 0
    assert {str(p): p.stat().st_mtime_ns for p in out.glob("pc-*-s0/checkpoints/**/*") if p.is_file()} == ckpts
    assert {str(p): p.stat().st_mtime_ns for p in out.glob("pc-*-s0/pc_eval.json")} == evals


@pytest.mark.parametrize("a, b, expected", [((0.10, 0.11), (0.12, 0.13), True), ((0.10, 0.125), (0.12, 0.13), False),
                                            ((0.12, 0.13), (0.10, 0.11), False)])
def test_a_verdict_holds_only_where_the_intervals_are_disjoint(a, b, expected):
    arms = {arm: {"val_loss": study.spread([lo, (lo + hi) / 2, hi])} for arm, (lo, hi) in
            (("ec-8e", a), ("dense", b))}
    v = pc.verdicts(arms)
    assert v["ec_beats_dense"]["value"] is expected
    assert v["capacity_binds"]["value"] is None  # its arms are missing
    one = {"ec-8e": {"val_loss": study.spread([0.1])}, "dense": {"val_loss": study.spread([0.2, 0.3])}}
    assert pc.verdicts(one)["ec_beats_dense"]["value"] is None
