"""The trainer on img2dataset-style web shards: 10% bad samples train (counted in metrics and the summary),
50% bad stop the run with one line."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, train  # noqa: E402

from data.webshards import write_web_shards  # noqa: E402

BASE = [*BASE, "train.wandb_mode=disabled"]  # no test here reads the wandb files


def test_ten_percent_bad_trains_and_is_counted(tmp_path):
    pattern, truth = write_web_shards(str(tmp_path / "web"), 4, 80, size=32, bad_fraction=0.1, seed=3)
    proc = train([*BASE, f"data.shards='{pattern}'", "train.steps=6", "data.shuffle_buffer=8",
                  f"train.run_dir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["data/good"] == last["samples_seen"] == 6 * 4
    bad = {r: last[f"data/bad/{r}"] for r in ("image", "caption")}
    assert sum(bad.values()) > 0 and all(bad[r] <= truth["bad"].get(r, 0) for r in bad)
    assert f"{last['data/good']} good samples, {sum(bad.values())} skipped as bad" in proc.stdout


def test_half_bad_stops_with_one_line(tmp_path):
    pattern, _ = write_web_shards(str(tmp_path / "web"), 4, 80, size=32, bad_fraction=0.5, seed=4)
    proc = train([*BASE, f"data.shards='{pattern}'", "train.steps=100", f"train.run_dir={tmp_path}/run"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "samples were bad" in lines[0] and "data.max_bad_fraction=25.0%" in lines[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["retry"] is False  # a requeue would meet the same data
