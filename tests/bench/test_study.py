"""The routing study pipeline end to end on a tiny config: four training runs through the Hydra trainer,
evaluation in every inference mode, the table, JSON and plots (the full study is a benchmark)."""

import json

import numpy as np
import pytest
from PIL import Image

from bench import study

TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.kv_heads=1", "data.batch_size=4",
        "train.log_every=1", "train.ckpt_every=3"]


@pytest.mark.slow
def test_study_runs_end_to_end_and_writes_table_json_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--steps", "3", "--prompts", "2", "--val-images", "8",
                       "--sample-steps", "2", "--data-samples", "48", "--shard-size", "24", *TINY]) == 0
    for name in ("loss.png", "load.png", "heatmap.png", "samples.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 100, name
    md = (out / "study.md").read_text()
    for label in study.LABELS.values():
        assert label in md
    res = json.loads((out / "study.json").read_text())["results"]
    assert set(res) == set(study.VARIANTS)
    assert set(res["dense"]["modes"]) == {"per_sample"}
    for v in ("ec", "tc", "diffmoe"):
        assert set(res[v]["modes"]) == set(study.MODES)
    for v, r in res.items():
        assert np.isfinite(r["final_loss"])
        for m in r["modes"].values():
            assert np.isfinite(m["val_loss"]) and m["ms_per_image"] > 0
            assert m["scorer_heldout"]["n"] == 2 and m["scorer_train"]["n"] == 2
            assert 0.0 <= m["scorer_heldout"]["overall"] <= 1.0
    assert res["dense"]["steps_to_dense"] is not None  # the dense run reaches its own final loss
    # Expert choice in fixed modes runs exactly f_c = 2 experts per token: the same FLOPs as the dense
    # model at equal activated compute, up to the routers.
    ec_group = res["ec"]["modes"]["group"]
    assert ec_group["experts_per_token"] == [2.0]
    assert ec_group["gflops_per_image"] == pytest.approx(res["dense"]["modes"]["per_sample"]["gflops_per_image"],
                                                         rel=0.01)
    # Dynamic modes measure their own work; token choice without capacity runs exactly top_k = 2.
    assert res["tc"]["modes"]["dynamic"]["experts_per_token"] == [2.0]
    assert res["diffmoe"]["modes"]["dynamic"]["experts_per_token"][0] > 0
    # A second call with --skip-train evaluates the same runs again without training.
    log_sizes = {p.name: p.stat().st_size for p in out.glob("train-*.log")}
    assert study.main(["--out", str(out), "--steps", "3", "--prompts", "2", "--val-images", "8",
                       "--sample-steps", "2", "--data-samples", "48", "--shard-size", "24", *TINY,
                       "--skip-train", "--variants", "dense", "ec"]) == 0
    assert {p.name: p.stat().st_size for p in out.glob("train-*.log")} == log_sizes
    assert set(json.loads((out / "study.json").read_text())["results"]) == {"dense", "ec"}
