"""The GPU suite's dry run: bench/gpu.sh --dry-run runs every stage on CPU with tiny presets, so the
script is known to work before any device time is spent (figures are not asserted: benchmarks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite import STAGES, missing_torch_apis, project_torch_names

ROOT = Path(__file__).resolve().parents[2]


def test_every_torch_api_the_project_uses_resolves_here():
    names = project_torch_names()
    assert {"torch.distributed.fsdp.fully_shard", "torch._grouped_mm", "torch.compiler.is_compiling"} <= names
    assert missing_torch_apis() == []


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert {fig[f"stage_{s}_status"] for s in STAGES} == {"ok"}, {k: v for k, v in fig.items() if "error" in k}
    assert fig["dry_run"] and fig["a_missing_torch_apis"] == "none"
    assert fig["b_torch_loss_finite"] and fig["b_resume_ok"] and fig["b_deepspeed_loss_finite"]
    assert fig["b_megatron_grad_max_diff"] < 1e-3
    for key in ("c_eager_ec_vs_dense_eq_ratio", "c_eager_ec_grouped_mm_vs_bmm_ratio",
                "c_compiled_ec_compiled_vs_eager_ratio", "c_ac_ec_step_ms", "d_ec_tokens_vs_dense_ratio",
                "e_ec_xl_8e_max_batch", "e_ec_3xl_8e_max_batch_extrapolated"):
        assert key in fig, key
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| e memory | ok |" in md and "Top kernels of one ec+compile step" in md
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "stage a (environment): start" in log and "stage e (memory): ok" in log
