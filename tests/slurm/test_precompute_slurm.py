"""launch/slurm/precompute.sbatch under a real slurm (one node on localhost, CPU): two tasks of one process,
the shape of a two-node job; the warning signal requeues the job mid-run, and the requeued job keeps the
finished shards and encodes the rest."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.test_slurm import ENDED, job, wait_done, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slurm
@pytest.mark.distributed
def test_requeued_precompute_keeps_finished_shards_and_completes(slurm, tmp_path):
    from data.synthetic import write_shards

    write_shards(str(tmp_path / "in"), 48, 16, 32, progress=False)
    shard = [tmp_path / "in" / f"shapes-{i:06d}.tar" for i in range(3)]
    go = tmp_path / "go"
    # Rank 0 reads shards 0 and 2, rank 1 shard 1; shard 2 stalls until `go` exists, so the job is mid-run.
    inputs = f"{shard[0]}::{shard[1]}::pipe:test -e {go} || sleep 60; cat {shard[2]}"
    out = tmp_path / "latents"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.update(SLURM_CONF=slurm["SLURM_CONF"], NPROC_PER_NODE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out", "launch/slurm/precompute.sbatch", "--input", inputs,
                           "--output", str(out), "--text-storage", "ids", "--max-text-len", "16", "--batch-size", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    done = [out / "shapes-000000.tar", out / "shapes-000001.tar"]
    wait_for(lambda: all(p.exists() for p in done) or job(slurm, job_id)["JobState"] in ENDED, 120, "two shards")
    assert not (out / "shapes-000002.tar").exists(), log.read_text()[-3000:]
    stamps = [p.stat().st_mtime_ns for p in done]
    go.touch()
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)
    info = wait_done(slurm, job_id, log, timeout=180)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert f"[slurm] SIGUSR1: requeueing job {job_id}" in text
    assert f"job {job_id} restart 1: 2 task(s) x 1 processes" in text
    assert [p.stat().st_mtime_ns for p in done] == stamps  # the requeued job kept them
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 48 and manifest["last_run"] == {**manifest["last_run"], "world_size": 2,
                                                                  "new_shards": 1, "new_samples": 16}
    ranks = {json.loads((out / ".precompute" / f"{p.name}.json").read_text())["rank"] for p in done}
    assert ranks == {0, 1}
