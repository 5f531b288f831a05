"""Whether a slurm job whose `srun` has ended is requeued, with one line saying why (launch/slurm/train.sbatch).

    python -m launch.requeue RUN_DIR --exit SRUN_STATUS [--max-failures 3] [--job ID]

Exit 0: requeue the job; 1: let it end. What it reads, through the run directory's protocol
(train/rundir.py): RUN_DIR/status.json and the whole checkpoints under RUN_DIR/checkpoints. What it decides:

* `finished`: end (the last step is done, or the finite data stream ended).
* `stopped` and srun succeeded: requeue (the warning signal: checkpoint saved, resume where it stopped).
* `failed` with `retry: false` (a config error, non-finite losses, too many bad samples, a failure
  torchrun's restarts already repeated): end; a restart would meet it again.
* Anything else (a killed or crashed process, a lost node, a stalled rank, a collective that timed out):
  a failure, appended to RUN_DIR/failures.jsonl with the step of the newest whole checkpoint (a damaged
  newer one is no progress). Requeue while the failures in a row without a newer whole checkpoint number at
  most `max_failures`; then end. A failure costs
  the steps since the latest checkpoint (plus a restart), so a run making progress is requeued however
  often it fails, and one that fails at the same place every time stops after `max_failures` restarts.

No torch import: it runs in the batch shell after the trainers have exited.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from train.rundir import CHECKPOINTS, append_failure, newest_whole, read_status, step_of


def whole_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest whole checkpoint, 0 if none. Whole by its files' presence and sizes against
    its meta.json: the checksums, which would read every byte of a large model's checkpoint in the batch
    shell, are the resuming trainer's check."""
    path = newest_whole(Path(run_dir) / CHECKPOINTS, checksums=False)
    return step_of(path) if path is not None else 0


def decide(run_dir: Path, srun_exit: int, max_failures: int, job: str = "") -> tuple[bool, str]:
    """(requeue?, the line that says why); records a failure in RUN_DIR/failures.jsonl."""
    status = read_status(run_dir)
    state = status.get("state")
    if state is None and srun_exit == 0:
        return False, "srun succeeded but the run wrote no status.json: not requeueing"
    if state == "finished":
        why = f" ({status['reason']})" if status.get("reason") else ""
        return False, f"the run finished at step {status.get('step')}{why}: not requeueing"
    if state == "stopped" and srun_exit == 0:
        return True, (f"the run stopped at step {status.get('step')} after its checkpoint (warning signal): "
                      f"requeueing to resume from it")
    if state == "failed" and not status.get("retry", True):
        return False, f"not requeueing: {status.get('error')} (a restart would repeat it)"
    failure = (status.get("error") if state == "failed" else
               f"srun exited {srun_exit} with no error recorded by the trainer (a process was killed, crashed "
               f"or lost its node: see the log above)")
    step = whole_checkpoint_step(run_dir)
    rows = append_failure(run_dir, {"time": time.time(), "job": job, "exit": srun_exit, "checkpoint_step": step,
                                    "failure": failure})
    streak = 0
    for row in reversed(rows):
        if row["checkpoint_step"] != step:
            break
        streak += 1
    if streak > max_failures:
        return False, (f"giving up: {streak} failures in a row with no checkpoint after step {step} "
                       f"(MAX_FAILURES={max_failures}); the last: {failure}")
    return True, (f"failure {streak} of at most {max_failures} in a row since the checkpoint of step {step}: "
                  f"{failure}; requeueing to resume from it")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--exit", type=int, required=True, dest="srun_exit", help="srun's exit status")
    ap.add_argument("--max-failures", type=int, default=3, help="failures in a row without progress to requeue")
    ap.add_argument("--job", default="", help="the slurm job id (recorded with a failure)")
    args = ap.parse_args(argv)
    if args.max_failures < 0:
        ap.error(f"--max-failures={args.max_failures} must be >= 0")
    requeue, line = decide(args.run_dir, args.srun_exit, args.max_failures, args.job)
    print(f"[slurm] {line}", flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
