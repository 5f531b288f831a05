"""The trainer resumed at another world size continues the data stream (no sample twice, none skipped)
and the LR schedule, from a checkpoint written by 2 ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.stream import merge_states

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env, losses  # noqa: E402

SHARD, SHARDS = 32, 8
ARGS = [*BASE, "train.wandb_mode=disabled", "model.moe.num_experts=4", "optim.warmup_steps=20", "optim.lr=1e-4",
        "train.ckpt_every=6", "parallel=fsdp"]


def shapes_shards(tmp_path_factory, shard: int, shards: int) -> str:
    """`data.shards=` of a generated shapes set of `shards` shards of `shard` samples."""
    out = tmp_path_factory.mktemp(f"shapes{shards}")
    subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(out), "--num-samples", str(shard * shards),
                    "--shard-size", str(shard)], cwd=ROOT, check=True, capture_output=True)
    return f"data.shards='{out}/shapes-{{000000..{shards - 1:06d}}}.tar'"


def remaining(states: list[dict], shard: int, shards: int) -> int:
    """Samples of epoch 0 not yet delivered, from every rank's saved data state (shards of `shard` samples)."""
    readers = [p["reader"] for s in states for p in s["data"]["workers"].values()]
    work = merge_states(readers, shards, shuffle=True)
    return sum(len(i.pending) + shard - min(i.upto, shard) for i in work.get(0, []))


@pytest.fixture(scope="module")
def shards8(tmp_path_factory) -> str:
    return shapes_shards(tmp_path_factory, SHARD, SHARDS)


@pytest.mark.distributed
def test_resume_at_another_world_size_continues_the_epoch(tmp_path, shards8):
    run = tmp_path / "run"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "train", *ARGS, shards8, "train.steps=6", f"train.run_dir={run}"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "train", *ARGS, shards8, "parallel=single", "train.steps=12",
                          f"train.run_dir={run}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 ranks: the data stream continues its epoch over 1 ranks" in one.stdout
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    states = [json.loads(f.read_text()) for f in sorted((final / "train").glob("rank*.json"))]
    delivered = 6 * 4 * 2 + 6 * 4  # steps x batch x ranks, before and after the restart
    assert states[0]["samples_seen"] == delivered
    assert SHARD * SHARDS - remaining(states, SHARD, SHARDS) == delivered  # each delivered sample a distinct one
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows}
    assert sorted(lr) == list(range(1, 13)) and sorted(losses(run)) == list(range(1, 13))
    for step, value in lr.items():  # warmup continues across the restart: update k uses 1e-4 * k / 20
        assert value == pytest.approx(1e-4 * step / 20, rel=1e-6), (step, value)
    assert rows[-1]["data/good"] == delivered and rows[-1]["data/bad/image"] == 0
