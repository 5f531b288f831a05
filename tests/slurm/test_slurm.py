"""launch/slurm/train.sbatch under a real slurm (one node on localhost, CPU): training with two launchers
on one node, the DeepSpeed launcher, preemption -> checkpoint -> requeue -> exact resume, and what the job
survives by itself: a killed rank and a stopped rank (torchrun restarts the worker group, the job finishes
with the uninterrupted run's losses) and a rank that crashes at the same step every time (requeued up to
MAX_FAILURES, then the job ends saying so). The command lines that depend on the node count are checked
with stand-ins for srun/scontrol (no slurm)."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = "launch/slurm/train.sbatch"
MODEL = ["model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1", "model.moe.num_experts=4",
         "model.moe.group_size=256", "model.moe.inference_group_size=256"]
BASE = [*MODEL, "train.log_every=1", "train.ckpt_every=100", "data.batch_size=4", "data.shuffle_buffer=50",
        "train.sample_steps=2", "train.sample_prompts=[a red circle]", "train.threads=1"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]  # the script's GPU defaults, overridden


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(out), "--num-samples", "256",
                    "--shard-size", "64"], cwd=ROOT, check=True, capture_output=True)
    return f"data.shards='{out}/shapes-{{000000..000003}}.tar'"


def _job_env(slurm, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    return {**env, "SLURM_CONF": slurm["SLURM_CONF"], "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def submit(slurm, sbatch_opts, overrides, log_dir: Path, **env) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_opts, f"--output={log_dir}/slurm-%j.out", SBATCH,
                           *overrides], cwd=ROOT, env=_job_env(slurm, **env), capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip().split(";")[0]


def job(slurm, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=_job_env(slurm), capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(slurm, job_id: str, log: Path, timeout: float = 240) -> dict:
    def ended():
        info = job(slurm, job_id)
        return info if info["JobState"] in ENDED else None
    try:
        return wait_for(ended, timeout, f"job {job_id}")
    except AssertionError:
        subprocess.run(["scancel", job_id], env=_job_env(slurm))
        raise AssertionError(log.read_text()[-4000:] if log.exists() else f"job {job_id}: no log")


def worker_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the trainer process of `rank` in the run writing to `run_dir` (not its launcher)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"train.run_dir={run_dir}".encode() in cmd and f"RANK={rank}".encode() in env
                and b"torch.distributed.run" not in cmd and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"):
            return int(pid)
    return None


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(slurm, shapes, tmp_path_factory) -> Path:
    """12 steps of EC with EP 2 as two launchers of one process each (`--ntasks-per-node=2`): the shape of
    a two-node job on one machine."""
    tmp = tmp_path_factory.mktemp("straight")
    job_id = submit(slurm, [*CPU_JOB, "--ntasks-per-node=2"],
                    [*BASE, shapes, "parallel=fsdp_ep", "train.steps=12", f"train.run_dir={tmp}/run"], tmp,
                    NPROC_PER_NODE="1")
    log = tmp / f"slurm-{job_id}.out"
    info = wait_done(slurm, job_id, log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log.read_text()[-4000:]
    return tmp


@pytest.mark.slurm
@pytest.mark.distributed
def test_two_tasks_train_and_checkpoint(uninterrupted):
    log = next(uninterrupted.glob("slurm-*.out")).read_text()
    assert "2 task(s) x 1 processes, torchrun" in log and "2 ranks, ep 2" in log, log[-3000:]
    run = uninterrupted / "run"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000012"]
    assert json.loads((run / "status.json").read_text()) == {"state": "finished", "step": 12, "steps": 12}
    assert sorted(losses(run)) == list(range(1, 13))


@pytest.mark.slurm
@pytest.mark.distributed
def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm, shapes, uninterrupted, tmp_path):
    """The warning signal as `#SBATCH --signal=B:USR1@N` sends it (to the batch shell): the trainers
    checkpoint and exit, the script requeues, the requeued job resumes; the whole job's losses equal the
    uninterrupted run's (one task of two processes here, two tasks of one there: the same two ranks)."""
    run = tmp_path / "run"
    job_id = submit(slurm, [*CPU_JOB, "--ntasks-per-node=1", "--cpus-per-task=2"],
                    [*BASE, shapes, "parallel=fsdp_ep", "train.steps=12", f"train.run_dir={run}"], tmp_path,
                    NPROC_PER_NODE="2")
    log = tmp_path / f"slurm-{job_id}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "3 logged steps")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=_job_env(slurm), check=True)
    wait_for(lambda: job(slurm, job_id)["Restarts"] == "1" or job(slurm, job_id)["JobState"] in ENDED, 120,
             "the requeue")
    info = wait_done(slurm, job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    stopped = int(re.search(r"checkpoint saved at step (\d+); exiting", text).group(1))
    assert 3 <= stopped < 12, text[-3000:]
    assert f"[slurm] the run stopped at step {stopped} after its checkpoint (warning signal): requeueing" in text
    assert f"resumed from {run}/checkpoints/step_{stopped:08d}" in text
    assert "[slurm] job %s restart 1" % job_id in text
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1] == "step_00000012"
    assert losses(run) == losses(uninterrupted / "run")  # every step, bit for bit


def _fault_mid_run(slurm, shapes, tmp_path, signal_name: str, *extra) -> tuple[Path, str, Path, int]:
    """Submit the uninterrupted run's job (2 tasks x 1 process, checkpoints every 4 steps), send `signal_name`
    to the rank-1 trainer once step 6 is logged; (run dir, job id, log, pid signalled)."""
    run = tmp_path / "run"
    job_id = submit(slurm, [*CPU_JOB, "--ntasks-per-node=2"],
                    [*BASE, shapes, "parallel=fsdp_ep", "train.steps=12", "train.ckpt_every=4",
                     f"train.run_dir={run}", *extra], tmp_path, NPROC_PER_NODE="1")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 6, 240, "6 logged steps")
    pid = worker_pid(run, 1)
    assert pid is not None
    subprocess.run(["kill", f"-{signal_name}", str(pid)], check=True)
    return run, job_id, tmp_path / f"slurm-{job_id}.out", pid


@pytest.mark.slurm
@pytest.mark.distributed
def test_a_killed_rank_restarts_the_worker_group_and_the_job_finishes_exactly(slurm, shapes, uninterrupted,
                                                                              tmp_path):
    run, job_id, log, _ = _fault_mid_run(slurm, shapes, tmp_path, "KILL")
    info = wait_done(slurm, job_id, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    resumed = re.search(r"worker group restart 1 \(torchrun --max-restarts\): continuing from (\S+)", text)
    assert resumed and Path(resumed.group(1)).name in ("step_00000004", "step_00000008"), text[-4000:]
    assert "worker group restart 2" not in text and "connectFullMesh failed" not in text  # one restart did it
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert losses(run) == losses(uninterrupted / "run")  # every step, bit for bit, the resumed ones included


@pytest.mark.slurm
@pytest.mark.distributed
def test_a_stopped_rank_is_given_up_on_within_the_timeout_and_the_job_finishes(slurm, shapes, uninterrupted,
                                                                               tmp_path):
    """SIGSTOP, never continued: rank 0 gives up after parallel.timeout_s (plus a margin for the step it was
    in and a loaded machine) with its stacks in stalls/; torchrun kills the stopped process and restarts the
    group, which finishes with the uninterrupted losses."""
    timeout_s, margin_s = 10, 50
    run, job_id, log, pid = _fault_mid_run(slurm, shapes, tmp_path, "STOP", f"parallel.timeout_s={timeout_s}")
    stopped = time.time()
    dump = run / "stalls" / "rank00000.txt"
    wait_for(dump.exists, timeout_s + margin_s, "rank 0 to give up on the stopped rank")
    first = dump.read_text().splitlines()[0]
    assert first.startswith("rank 0: a collective failed after step ") and f"parallel.timeout_s={timeout_s}" in first
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", 120, "the stopped process to be killed")
    info = wait_done(slurm, job_id, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "worker group restart 1 (torchrun --max-restarts)" in text and "error: rank 0: a collective failed" in text
    assert "worker group restart 2" not in text and "connectFullMesh failed" not in text  # one restart did it
    assert losses(run) == losses(uninterrupted / "run")
    assert time.time() - stopped < 400


@pytest.mark.slurm
@pytest.mark.distributed
def test_a_rank_crashing_at_the_same_step_ends_the_job_after_max_failures(slurm, shapes, tmp_path):
    """Rank 1 aborts before step 6 in every attempt (checkpoint at step 4); torchrun does not restart
    (MAX_RESTARTS=0), the script requeues once (MAX_FAILURES=1), and the second failure from the same
    checkpoint ends the job with a last line saying so."""
    run = tmp_path / "run"
    job_id = submit(slurm, [*CPU_JOB, "--ntasks-per-node=2"],
                    [*BASE, shapes, "parallel=fsdp_ep", "train.steps=12", "train.ckpt_every=4", f"train.run_dir={run}"],
                    tmp_path, NPROC_PER_NODE="1", MODULE="tests.slurm.crashing_train", CRASH_STEP="6",
                    MAX_RESTARTS="0", MAX_FAILURES="1")
    log = tmp_path / f"slurm-{job_id}.out"
    info = wait_done(slurm, job_id, log, timeout=400)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", text[-4000:]
    # The failure each attempt saw: rank 0's collective failed when rank 1 died before step 6.
    assert ("[slurm] failure 1 of at most 1 in a row since the checkpoint of step 4: rank 0: a collective failed "
            "after step 5") in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("[slurm] giving up: 2 failures in a row with no checkpoint after step 4 "
                           "(MAX_FAILURES=1); the last: "), text[-3000:]
    rows = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert [r["checkpoint_step"] for r in rows] == [4, 4] and rows[0]["job"] == job_id


@pytest.mark.slurm
@pytest.mark.distributed
def test_deepspeed_launcher_trains_under_slurm(slurm, shapes, tmp_path):
    run = tmp_path / "run"
    job_id = submit(slurm, [*CPU_JOB, "--cpus-per-task=2"],
                    [*BASE, shapes, "parallel=deepspeed_zero2", "train.steps=3", f"train.run_dir={run}"],
                    tmp_path, NPROC_PER_NODE="2", LAUNCHER="deepspeed")
    log = tmp_path / f"slurm-{job_id}.out"
    info = wait_done(slurm, job_id, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-4000:]
    assert "1 task(s) x 2 processes, deepspeed" in text and "engine deepspeed" in text, text[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "checkpoints" / "step_00000003").is_dir()


# --- Command lines at N nodes, with stand-ins for srun and scontrol (no slurm needed) ---

FAKE_SRUN = """#!/usr/bin/env bash
# Runs the step's command once per task, as srun would, with SLURM_PROCID set.
while [[ "$1" == --* ]]; do shift; done
for ((r = 0; r < SLURM_NTASKS; r++)); do SLURM_PROCID=$r "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && { for i in $(seq -w 1 "$FAKE_NODES"); do echo "node$i"; done; exit 0; }
echo "scontrol $*" >> "$FAKE_CALLS"
"""


def _fake_slurm(tmp_path: Path, nodes: int, **env) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_NTASKS": str(nodes), "FAKE_NODES": str(nodes),
            "FAKE_CALLS": str(tmp_path / "calls"), "LAUNCH_DRY_RUN": "1", **env}


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sixteen_node_command_lines(tmp_path, launcher):
    env = _fake_slurm(tmp_path, 16, SLURM_GPUS_PER_NODE="h100:8", LAUNCHER=launcher, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", SBATCH, "experiment=paper_xl_8e", "train.name=xl"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "job 4242 restart 0: 16 task(s) x 8 processes" in proc.stdout
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "python" in line or ".venv" in line]
    assert len(commands) == 16
    for rank, cmd in enumerate(commands):
        assert cmd[-3:] == ["experiment=paper_xl_8e", "train.name=xl", "train.run_dir=runs/xl"]
        if launcher == "torchrun":  # c10d rendezvous, so that a failed worker restarts the group on every node
            assert {"--nnodes=16", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:24242",
                    "--rdzv-id=4242", "--max-restarts=3"} <= set(cmd) and cmd[cmd.index("-m", 2) + 1] == "train"
        else:
            assert "--master_addr=node01" in cmd and "--master_port=24242" in cmd
            assert f"--node_rank={rank}" in cmd
            hostfile = next(a.split("=", 1)[1] for a in cmd if a.startswith("--hostfile="))
            assert Path(hostfile).read_text().splitlines() == [f"task{i} slots=8" for i in range(16)]
            assert "--no_ssh" in cmd and "train/__main__.py" in cmd
    assert not (tmp_path / "calls").exists()  # a run that wrote no status.json is not requeued


def test_no_gpus_and_no_nproc_is_refused(tmp_path):
    env = _fake_slurm(tmp_path, 1, SLURM_GPUS_PER_NODE="0")
    proc = subprocess.run(["bash", SBATCH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "set NPROC_PER_NODE" in proc.stderr


def test_the_script_asks_for_the_warning_in_the_batch_shell():
    directives = [line.split(None, 1)[1] for line in (ROOT / SBATCH).read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "--signal=B:USR1@120" in directives and "--requeue" in directives
