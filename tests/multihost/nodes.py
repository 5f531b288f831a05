"""Starting `launch/multinode_torchrun.sh` on the hosts of a Cluster, and watching a run's steps from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def node_env(**extra: str) -> dict:
    """The machine's environment without a parent launcher's rank variables, plus `extra`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(k, None)
    return {**env, **extra}


def start_nodes(cluster, hosts: list[int], args: list[str], log_dir: Path, master: str | None = None,
                **env: str) -> dict[int, subprocess.Popen]:
    """One `launch/multinode_torchrun.sh args` per host (NODE_RANK = its place in `hosts`), with MASTER_ADDR
    host 0's address unless `master`; output appended to log_dir/node{i}.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for rank, i in enumerate(hosts):
        with open(log_dir / f"node{i}.log", "a") as log:
            procs[i] = cluster.popen(i, ["bash", "launch/multinode_torchrun.sh", *args], cwd=ROOT,
                                     env=node_env(NODE_RANK=str(rank), MASTER_ADDR=master or cluster.address(0),
                                                  NPROC="1", **env),
                                     stdout=log, stderr=subprocess.STDOUT, text=True)
    return procs


def wait_all(procs: dict[int, subprocess.Popen], timeout: float) -> dict[int, int]:
    """Exit codes, once every process has ended; TimeoutError naming the ones still running."""
    deadline = time.monotonic() + timeout
    for i, p in procs.items():
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"host {i} still running after {timeout:g} s") from None
    return {i: p.returncode for i, p in procs.items()}


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


class StepProbe:
    """Polls metrics.jsonl (rank 0 writes one row per logged step) and, with each new row, the time and the
    bytes that crossed host `host`'s link so far (0 without a cluster)."""

    def __init__(self, cluster, run_dir: Path, host: int = 1):
        self.cluster, self.run_dir, self.host = cluster, Path(run_dir), host
        self.seen: list[tuple[dict, float, int]] = []  # (row, time.monotonic(), link bytes)

    def poll(self) -> list[tuple[dict, float, int]]:
        now = time.monotonic()
        sent = self.cluster.link_bytes(self.host) if self.cluster is not None else 0
        new = rows(self.run_dir)[len(self.seen):]
        self.seen += [(r, now, sent) for r in new]
        return self.seen

    def since(self, t: float) -> list[dict]:
        """The rows that appeared after time.monotonic() was `t`."""
        return [r for r, at, _ in self.poll() if at > t]

    def wait(self, until, timeout: float, procs: dict[int, subprocess.Popen] | None = None,
             every: float = 0.01) -> float:
        """Poll until `until()` is true and return the time it became so; TimeoutError after `timeout` s, or
        RuntimeError when one of `procs` ends first."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if until():
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:g} s: steps {[r['step'] for r, _, _ in self.seen]}")
            for i, p in (procs or {}).items():
                if p.poll() is not None:
                    raise RuntimeError(f"host {i} exited {p.returncode} first")
            time.sleep(every)


def per_step(seen: list[tuple[dict, float, int]], first: int, last: int) -> tuple[float, float]:
    """(seconds, link bytes) per step between the rows of steps `first` and `last` (their first sighting)."""
    at = {}
    for row, t, sent in seen:
        at.setdefault(row["step"], (t, sent))
    (t0, b0), (t1, b1) = at[first], at[last]
    return (t1 - t0) / (last - first), (b1 - b0) / (last - first)
