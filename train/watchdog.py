"""Bounded waits with a diagnosis: collective timeouts, the NCCL flight recorder, and a step watchdog.

* `flight_recorder_env(run_dir)`: the NCCL flight recorder on, dumping into run_dir/comm_trace/ when a
  collective times out (set before the process group exists; the launchers set the same defaults).
* `set_collective_timeout(seconds)`: every process group of this process (the default one, the device
  mesh's, megatron-core's and DeepSpeed's) waits at most that long in a collective, gloo and NCCL alike.
* `StepWatchdog`: no optimizer step for `timeout_s` -> this rank writes every thread's stack to
  run_dir/stalls/rankNNNNN.txt, prints one line and exits (code 4).
* `dump_stacks` / `is_comm_failure`: what a rank whose collective failed (a peer stopped or died) leaves.

faulthandler writes the stacks: it works while the main thread is blocked inside a C++ collective. The
watchdog is a thread rather than `faulthandler.dump_traceback_later` so that the dump and the console
line say which rank stalled, after which step, and where its main thread was.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .rundir import COMM_TRACE, stall_file

STALL_EXIT_CODE = 4
PROJECT_DIRS = ("train", "model", "parallel", "data", "launch")


def flight_recorder_env(run_dir: Path) -> dict[str, str]:
    """The NCCL flight recorder's settings: a trace buffer, a dump on timeout, into run_dir/comm_trace/
    (one file per rank; read with `python -m torch.distributed.flight_recorder.fr_trace`)."""
    return {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(Path(run_dir).resolve() / COMM_TRACE / "rank_")}


def set_collective_timeout(seconds: float) -> None:
    """Every process group of this process times out a collective after `seconds` (torchtitan's
    `set_pg_timeouts`). Collective: the ranks meet in a barrier first, so that no rank runs a collective
    under the new timeout while another is still in start-up under the old one."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world
    dist.barrier()
    for group in list(_world.pg_map):
        if not dist.distributed_c10d._rank_not_in_group(group):
            _set_pg_timeout(timedelta(seconds=seconds), group)


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because of another rank: a timeout or a peer that went away."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "gloo", "NCCL", "Timed out waiting", "Connection closed by peer", "Connection reset", "Broken pipe"))


def _where(frame) -> str:
    """`func (file:line)` of the innermost frame, and of the innermost frame of this project if that differs."""
    inner = f"{frame.f_code.co_name} ({_short(frame.f_code.co_filename)}:{frame.f_lineno})"
    f = frame
    while f is not None and not _short(f.f_code.co_filename).startswith(PROJECT_DIRS):
        f = f.f_back
    if f is None or f is frame:
        return inner
    return f"{inner}, called from {f.f_code.co_name} ({_short(f.f_code.co_filename)}:{f.f_lineno})"


def _short(path: str) -> str:
    """A source path relative to the project or to site-packages."""
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    if path.startswith(root):
        return path[len(root):]
    return path.split("site-packages" + os.sep)[-1]


def dump_stacks(run_dir: Path, rank: int, header: str) -> Path:
    """Write `header` and every thread's Python stack to run_dir/stalls/rankNNNNN.txt; its path."""
    path = stall_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(header.rstrip() + "\n\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return path


def main_thread_where() -> str:
    """Where the main thread is now (`_where` of its current frame)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    return _where(frame) if frame is not None else "unknown"


def frame_where(tb) -> str:
    """`_where` of the innermost frame of a traceback."""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _where(tb.tb_frame)


class StepWatchdog:
    """A daemon thread that ends the process when `beat` has not been called for `timeout_s` seconds."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int):
        self.timeout_s, self.run_dir, self.rank = timeout_s, Path(run_dir), rank
        self.step, self.last = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, step: int) -> None:
        if self.timeout_s <= 0:
            return
        self.beat(step)
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """Progress: an optimizer step (or a checkpoint) completed."""
        self.step, self.last = step, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        where = main_thread_where()
        line = (f"rank {self.rank} stalled: no optimizer step for {idle:.0f} s (train.stall_timeout_s="
                f"{self.timeout_s:g}) after step {self.step}, in {where}")
        path = dump_stacks(self.run_dir, self.rank, line)
        sys.stderr.write(f"error: {line}; stacks in {path}; exiting\n")
        sys.stderr.flush()
        os._exit(STALL_EXIT_CODE)
