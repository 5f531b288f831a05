"""launch/plan.py: the M-64E sharding plan on 64 ranks, without allocating the model."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_m64e_plan_for_64_gpus_without_allocating(tmp_path):
    out = tmp_path / "plan.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "launch/plan.py", "--preset", "ec-m-64e", "--nodes", "8",
                           "--gpus-per-node", "8", "--ep", "8", "16", "64", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(peak_kib, before) < 2 * 2**20  # < 2 GiB resident: the 97B (390 GB fp32) model is never built
    assert "ec-m-64e: 64 ranks" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["ep"] for r in rows] == [8, 16, 64]
    from model.config import get_preset
    from model.params import param_counts
    total = param_counts(get_preset("ec-m-64e")).total
    for r in rows:
        # FSDP shards everything over the 64 ranks (experts over ep x dp/ep): ~1/64 each (+ padding).
        assert total / 64 <= r["params_per_rank"] <= total / 64 * 1.01
        assert r["alltoall_gib_per_step"] > 0
    # More expert parallelism: fewer experts per all-gathered block, more traffic off-rank.
    assert rows[0]["working_gib"] > rows[1]["working_gib"] > rows[2]["working_gib"]
    assert rows[0]["alltoall_gib_per_step"] < rows[2]["alltoall_gib_per_step"]


def test_plan_rejects_an_ep_that_does_not_divide_the_experts():
    proc = subprocess.run([sys.executable, "launch/plan.py", "--preset", "ec-xl-8e", "--nodes", "2",
                           "--gpus-per-node", "8", "--ep", "16"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "model.moe.num_experts=8 must be divisible by parallel.ep=16" in proc.stderr



def test_plan_counts_the_ema_copy_like_the_parameters():
    from launch.plan import plan
    from model.config import get_preset
    with_ema, without = (plan(get_preset("ec-xl-8e"), 8, [8], 32, False, 120, ema=ema)[0] for ema in (True, False))
    assert without["ema_gib"] == 0 and with_ema["ema_gib"] == with_ema["params_gib"] > 0  # fp32, sharded
    assert with_ema["total_gib"] - without["total_gib"] == pytest.approx(with_ema["params_gib"])


def test_comm_bytes_split_by_link_and_backend():
    """Ranks of one expert-parallel group are consecutive: ep 8 stays in an 8-GPU node, ep 16 sends half of its
    slots to the other node; FSDP over 16 ranks crosses nodes; gloo's reduce-scatter is an allreduce."""
    from launch.plan import alltoall_bytes, comm_bytes, param_groups
    from model.config import get_preset
    cfg = get_preset("ec-xl-8e")
    in_node = comm_bytes(cfg, 8, 8, 32, 8)
    assert in_node["alltoall_inter"] == 0 and in_node["fsdp_inter"] == 0 and in_node["alltoall_intra"] > 0
    assert in_node["alltoall_intra"] == pytest.approx(alltoall_bytes(cfg, 32, cfg.kept_tokens, 8))
    two = comm_bytes(cfg, 16, 16, 32, 8)
    assert two["alltoall_inter"] == pytest.approx(8 / 7 * two["alltoall_intra"])  # 8 of 15 peers off the node
    assert two["fsdp_intra"] == 0 and two["fsdp_inter"] > 0
    n = param_groups(cfg)
    one_node = comm_bytes(cfg, 8, 1, 32, 8, param_dtype="fp32")  # no EP: experts are sharded with their block
    assert one_node["fsdp_intra"] == pytest.approx(7 / 8 * (n["root"] * (4 + 4) + (n["blocks"] + n["experts"]) * (8 + 4)))
    gloo = comm_bytes(cfg, 8, 1, 32, 8, param_dtype="fp32", backend="gloo")
    assert gloo["fsdp_intra"] - one_node["fsdp_intra"] == pytest.approx(7 / 8 * sum(n.values()) * 4)
