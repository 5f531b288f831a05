"""The torch engine and DeepSpeed ZeRO-2 on the same config: the same learning rate at every update
(one schedule, train/backends.py lr_schedule) and the same losses within float tolerance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env, shapes  # noqa: E402,F401

ARGS = [*BASE, "train.steps=5", "optim.warmup_steps=3", "optim.lr=3e-4", "model.moe.num_experts=4"]


def _run(parallel: str, run_dir: Path, shapes_arg: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
           *ARGS, shapes_arg, f"parallel={parallel}", f"train.run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_torch_and_deepspeed_engines_agree(tmp_path, shapes):
    torch_rows = _run("single", tmp_path / "torch", shapes)
    ds_rows = _run("deepspeed_zero2", tmp_path / "ds", shapes)
    expected = [3e-4 * min(1.0, s / 3) for s in range(1, 6)]  # update k uses lr * k / warmup
    assert [r["lr"] for r in torch_rows] == pytest.approx(expected, rel=1e-9)
    assert [r["lr"] for r in ds_rows] == pytest.approx(expected, rel=1e-9)
    assert [r["loss"] for r in ds_rows] == pytest.approx([r["loss"] for r in torch_rows], rel=1e-4)
    assert [r["grad_norm"] for r in ds_rows] == pytest.approx([r["grad_norm"] for r in torch_rows], rel=1e-3)
