"""What a job survives without a person: the end of a finite stream at 1, 2 and 3 ranks (and 2 ranks resumed
at 3) is a clean stop after the same step on every rank, with a final checkpoint and every sample
delivered at most once; the step watchdog dumps the stacks and exits, as a unit and in a run whose step
blocks; a rank blocked in an expert-parallel collective of a 4-rank run is given up on, within
parallel.timeout_s and not init_timeout_s, by the ranks of its expert-parallel and FSDP mesh groups
(tests/train/stalling_train.py blocks them); the requeue decisions of launch/requeue.py; an error a restart
repeats is not retried by torchrun. Killed, stopped and crashing ranks under slurm are in
tests/slurm/test_slurm.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.requeue import decide
from train.rundir import FAILURES

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env  # noqa: E402
from test_elastic_resume import remaining, shapes_shards  # noqa: E402

SHARD, SHARDS = 32, 4  # 128 samples; batch 4
ARGS = [*BASE, "model.moe.num_experts=4", "train.ckpt_every=100", "parallel=fsdp", "data.epochs=1",
        "train.sample_prompts=[]"]


@pytest.fixture(scope="module")
def shards4(tmp_path_factory) -> str:
    return shapes_shards(tmp_path_factory, SHARD, SHARDS)


def _train(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "train", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _check_clean_end(proc, run: Path) -> dict:
    """The run ended by itself after the data: exit 0, no traceback, status `finished` (data exhausted), a final
    checkpoint of the last step, and every delivered sample a distinct one (the final checkpoint's data
    positions account for all 128: delivered + left unread)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["reason"] == "data exhausted", status
    assert f"data exhausted after step {status['step']}" in proc.stdout
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert final.name == f"step_{status['step']:08d}"
    states = [json.loads(f.read_text()) for f in sorted((final / "train").glob("rank*.json"))]
    left = remaining(states, SHARD, SHARDS)
    assert SHARD * SHARDS - left == status["samples_delivered"]  # each delivered sample a distinct one
    assert left == status["samples_unread"]
    assert not (run / "samples").exists()  # train.sample_prompts=[]: no sample grid
    return status


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_finite_stream_ends_cleanly_on_every_rank(tmp_path, shards4, ranks):
    run = tmp_path / "run"
    proc = _train(ranks, [*ARGS, shards4, "train.steps=1000", f"train.run_dir={run}"])
    status = _check_clean_end(proc, run)
    # Shards 0..3 dealt to readers r, r + ranks, ...: 3 ranks hold 64, 32 and 32 samples; all stop with the
    # ranks that ran dry after 8 steps, the 32 samples rank 0 still had are left unread.
    expected = {1: (32, 128, 0), 2: (16, 128, 0), 3: (8, 96, 32)}[ranks]
    assert (status["step"], status["samples_delivered"], status["samples_unread"]) == expected


@pytest.mark.distributed
def test_finite_stream_resumed_at_another_world_size_ends_cleanly(tmp_path, shards4):
    """2 ranks for 5 steps, then 3 ranks to the end of the epoch: the elastic restore deals the remaining
    samples out unevenly, and the run still stops on every rank after the same step."""
    run = tmp_path / "run"
    two = _train(2, [*ARGS, shards4, "train.steps=5", f"train.run_dir={run}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    three = _train(3, [*ARGS, shards4, "train.steps=1000", f"train.run_dir={run}"])
    assert "the data stream continues its epoch over 3 ranks" in three.stdout
    status = _check_clean_end(three, run)
    assert status["step"] > 5 and status["samples_delivered"] + status["samples_unread"] == 128


def test_step_watchdog_dumps_every_stack_and_exits(tmp_path):
    code = ("import time; from pathlib import Path; from train.watchdog import StepWatchdog\n"
            f"w = StepWatchdog(1.0, Path({str(tmp_path)!r}), rank=3); w.start(7)\n"
            "def wait_for_the_peer(): time.sleep(60)\n"
            "wait_for_the_peer()\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4 and time.time() - start < 20
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 3 stalled: no optimizer step for "), proc.stderr
    assert "after step 7, in wait_for_the_peer (<string>:3)" in lines[0]
    dump = (tmp_path / "stalls" / "rank00003.txt").read_text()
    assert dump.startswith("rank 3 stalled") and 'File "<string>", line 3 in wait_for_the_peer' in dump


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (torchrun's workers run in sessions of their own)."""
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stalling(ranks: int, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """tests/train/stalling_train.py under torchrun (or alone): killed whole (torchrun and its workers) if it
    outlives `timeout`, and the test fails."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launcher, "-m", "tests.train.stalling_train", *args]
    with subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"still running after {timeout:.0f} s: nothing gave up\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_blocked_step_is_ended_by_the_step_watchdog(tmp_path, shards4):
    """A real run whose step 3 blocks (outside any collective): after train.stall_timeout_s the watchdog the
    trainer armed writes the stacks to run_dir/stalls/ and exits with code 4 and one line naming the step
    and where the main thread was."""
    run, timeout_s = tmp_path / "run", 3
    proc = _stalling(1, [*ARGS, shards4, "train.steps=6", f"train.stall_timeout_s={timeout_s}",
                         f"train.run_dir={run}"], {"STALL_STEP": "3", "STALL_IN": "step"}, timeout=60)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "step       2/6" in proc.stdout and "step       3/6" not in proc.stdout, proc.stdout
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank 0 stalled: no optimizer step for ") and (
        f"(train.stall_timeout_s={timeout_s}) after step 2, in blocked_forever (tests/train/stalling_train.py:"
        in errors[0]) and errors[0].endswith(f"stacks in {run / 'stalls' / 'rank00000.txt'}; exiting"), errors
    dump = (run / "stalls" / "rank00000.txt").read_text()
    assert dump.startswith("rank 0 stalled") and "in blocked_forever" in dump and "in train_step" in dump
    assert 'File "' in dump and "train/trainer.py" in dump  # every thread's Python stack


@pytest.mark.distributed
def test_a_rank_blocked_in_an_expert_parallel_collective_is_given_up_on_within_the_timeout(tmp_path, shards4):
    """4 ranks, FSDP2 + expert parallelism 2: the groups {0, 1} / {2, 3} (ep) and {0, 2} / {1, 3} (experts'
    FSDP, dp_shard_mod_ep) are process groups of their own, not the default one. Rank 1 blocks on entering
    step 3's first expert all-to-all: rank 0 waits inside that all-to-all (ep group), ranks 2 and 3 inside
    the FSDP all-gather of their experts (dp_shard_mod_ep group). Each gives up after parallel.timeout_s (the
    training timeout the trainer sets on every group after the first step), with its one-line diagnosis and
    its stacks, although parallel.init_timeout_s is 120 times longer."""
    run, mark, timeout_s, margin_s = tmp_path / "run", tmp_path / "blocked-at", 5, 20
    proc = _stalling(4, [*ARGS, shards4, "parallel=fsdp_ep", "parallel.ep=2", "train.steps=6",
                         f"parallel.timeout_s={timeout_s}", "parallel.init_timeout_s=600", f"train.run_dir={run}"],
                     {"STALL_STEP": "3", "STALL_RANK": "1", "STALL_IN": "ep", "STALL_MARK": str(mark)}, timeout=150)
    assert proc.returncode != 0 and "step       2/6" in proc.stdout, proc.stderr[-3000:]
    blocked = float(mark.read_text())
    errors = {int(line.split()[2].rstrip(":")): line for line in _errors(proc.stderr)}
    for rank in (0, 2, 3):
        line = errors.get(rank)
        assert line is not None and line.startswith(f"error: rank {rank}: a collective failed after step 2, in "), (
            rank, proc.stderr[-3000:])
        assert "parallel/expert_parallel.py" in line and f"Timed out waiting {timeout_s * 1000}ms" in line, line
        assert line.endswith(f"(parallel.timeout_s={timeout_s}, init_timeout_s=600): another rank stopped "
                             f"responding or died; stacks in {run / 'stalls' / f'rank{rank:05d}.txt'}"), line
        dump = run / "stalls" / f"rank{rank:05d}.txt"
        assert dump.read_text().startswith(line[len("error: "):line.index("; stacks in")])
        assert dump.stat().st_mtime - blocked < timeout_s + margin_s, (rank, dump.stat().st_mtime - blocked)
    assert 1 not in errors and not (run / "stalls" / "rank00001.txt").exists()  # the blocked rank was ended
    # rank 0 waited for the expert all-to-all's result, ranks 2 and 3 in the all-gather of their experts' shards
    assert "in wait_tensor" in (run / "stalls" / "rank00000.txt").read_text() and "all_gather" not in errors[0]
    assert all("in all_gather_single" in errors[r] for r in (2, 3))


@pytest.mark.distributed
def test_a_rank_blocked_in_the_first_step_is_given_up_on_within_the_start_up_timeout(tmp_path, shards4):
    """4 ranks, expert parallelism 2 (as above), rank 1 blocked on entering step 1's first expert all-to-all:
    ranks 0, 2 and 3 wait inside the collectives of the mesh's groups during start-up. Those groups are made
    after joining, with the backend's default timeout (30 min for gloo): the ranks give up after
    parallel.init_timeout_s only because the trainer sets it on every group once they exist."""
    run, init_s = tmp_path / "run", 5
    proc = _stalling(4, [*ARGS, shards4, "parallel=fsdp_ep", "parallel.ep=2", "train.steps=4",
                         f"parallel.init_timeout_s={init_s}", "parallel.timeout_s=600", f"train.run_dir={run}"],
                     {"STALL_STEP": "1", "STALL_RANK": "1", "STALL_IN": "ep"}, timeout=90)
    errors = {int(line.split()[2].rstrip(":")): line for line in _errors(proc.stderr)}
    assert proc.returncode != 0 and sorted(errors) == [0, 2, 3], proc.stderr[-3000:]
    for line in errors.values():
        assert " a collective failed after step 0, in " in line and f"Timed out waiting {init_s * 1000}ms" in line, line


def _status(run: Path, **status) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_text(json.dumps(status))


def _checkpoint(run: Path, step: int) -> None:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")


def test_requeue_decisions(tmp_path):
    run = tmp_path / "run"
    _status(run, state="finished", step=64, steps=100, reason="data exhausted")
    assert decide(run, 0, 3) == (False, "the run finished at step 64 (data exhausted): not requeueing")
    _status(run, state="stopped", step=7, steps=100)
    assert decide(run, 0, 3)[0] is True
    _status(run, state="failed", error="optim.lr=-1.0 must be > 0", retry=False)
    assert decide(run, 1, 3) == (False, "not requeueing: optim.lr=-1.0 must be > 0 (a restart would repeat it)")
    assert not (run / FAILURES).exists()

    (run / "status.json").unlink()  # a killed process writes nothing
    _checkpoint(run, 4)
    for k in (1, 2):
        requeue, line = decide(run, 137, 2, job="9")
        assert requeue and line.startswith(f"failure {k} of at most 2 in a row since the checkpoint of step 4: "
                                           "srun exited 137 with no error recorded")
    _checkpoint(run, 8)  # progress: the streak starts again
    assert decide(run, 1, 2)[1].startswith("failure 1 of at most 2 in a row since the checkpoint of step 8")
    _status(run, state="failed", error="rank 0: a collective failed after step 9", retry=True)
    assert decide(run, 1, 2)[0] is True
    requeue, line = decide(run, 1, 2)
    assert not requeue and line == ("giving up: 3 failures in a row with no checkpoint after step 8 "
                                    "(MAX_FAILURES=2); the last: rank 0: a collective failed after step 9")
    rows = [json.loads(r) for r in (run / FAILURES).read_text().splitlines()]
    assert [r["checkpoint_step"] for r in rows] == [4, 4, 8, 8, 8] and rows[0]["job"] == "9"


def test_requeue_progress_counts_whole_checkpoints_only(tmp_path):
    """A newer checkpoint whose files do not match its meta.json (a truncated or missing file) is no progress:
    the failure streak goes on from the newest whole one."""
    run = tmp_path / "run"
    _checkpoint(run, 4)
    assert decide(run, 137, 1)[0] is True
    damaged = run / "checkpoints" / "step_00000008"
    damaged.mkdir(parents=True)
    (damaged / "shard.bin").write_bytes(b"x" * 10)
    (damaged / "meta.json").write_text(json.dumps({"files": {"shard.bin": [20, 0]}}))
    requeue, line = decide(run, 137, 1)
    assert not requeue and line.startswith("giving up: 2 failures in a row with no checkpoint after step 4")
    (damaged / "shard.bin").write_bytes(b"x" * 20)  # whole by size: the batch shell does not hash
    assert decide(run, 137, 1)[1].startswith("failure 1 of at most 1 in a row since the checkpoint of step 8")


def test_requeue_imports_no_torch():
    code = "import sys, launch.requeue; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_torchrun_restart_does_not_repeat_an_error_a_restart_repeats(tmp_path, shards4):
    """A restarted worker (TORCHELASTIC_RESTART_COUNT > 0) whose previous attempt failed with a
    non-retryable error stops at once with one line, before building anything."""
    run = tmp_path / "run"
    _status(run, state="failed", error="3 non-finite losses in a row (train.max_nan_steps=3)", retry=False)
    proc = subprocess.run([sys.executable, "-m", "train", *ARGS, shards4, f"train.run_dir={run}"], cwd=ROOT,
                          env={**_env(), "TORCHELASTIC_RESTART_COUNT": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: not retrying: the previous attempt failed with an error a restart "
                                   "repeats: 3 non-finite losses in a row (train.max_nan_steps=3)")
    assert not (run / "checkpoints").exists()
