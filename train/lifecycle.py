"""A training process from start to end: validate the config before any process group exists, join the
group with the start-up timeout, run a `Trainer` (train/trainer.py), and record how the run ended in
run_dir/status.json (train/rundir.py), with the exit class that tells a launcher whether a restart can help
(train/failures.py). Signals (SIGTERM / SIGUSR1) ask the loop to checkpoint and exit at the next step."""

from __future__ import annotations

import os
import signal
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data import TooManyBadSamples
from data.shardlist import check_shard_list
from model.config import ConfigError, config_to_dict

from . import rundir
from .config import AppConfig, to_container, validate_app
from .failures import CollectiveFailure, StopTraining
from .trainer import Trainer, log0
from .watchdog import dump_stacks, flight_recorder_env, frame_where, is_comm_failure


class Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def run(cfg: AppConfig) -> dict:
    """Train as configured; returns a summary (paths, first/last loss, steps). A run that fails records
    why in run_dir/status.json (`failed`, and whether a restart can help) before the error propagates."""
    rank = int(os.environ.get("RANK", 0))
    run_dir = Path(cfg.train.run_dir)
    try:
        summary = _run(cfg, rank, run_dir)
    except (ConfigError, StopTraining, TooManyBadSamples) as e:
        rundir.write_status(run_dir, "failed", error=str(e), retry=False)
        raise
    except CollectiveFailure as e:
        rundir.write_status(run_dir, "failed", error=str(e), retry=True)
        raise
    if rank == 0:
        rundir.write_status(run_dir, **summary["status"])
    return summary


def _run(cfg: AppConfig, rank: int, run_dir: Path) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(_threads(cfg.train.threads))
    mcfg, pcfg = validate_app(cfg, world)  # before any process group
    check_shard_list(cfg.data, world)
    _refuse_repeated_failure(run_dir)
    device = _device()
    distributed = world > 1
    if distributed and not dist.is_initialized():
        for key, value in flight_recorder_env(run_dir).items():
            os.environ.setdefault(key, value)
        _join("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=pcfg.init_timeout_s))
    config_dict = to_container(cfg)
    config_dict["model_resolved"] = config_to_dict(mcfg)
    signals = Signals()
    trainer, group_failed = None, False
    try:
        trainer = Trainer(cfg, mcfg, pcfg, world, rank, device, config_dict, signals)
        return trainer.fit()
    except Exception as e:
        if not (distributed and is_comm_failure(e)):
            raise
        group_failed = True  # its teardown could wait on the peer that failed
        step = trainer.state.step if trainer is not None else 0
        line = (f"rank {rank}: a collective failed after step {step}, in {frame_where(e.__traceback__)}: "
                f"{str(e).strip().splitlines()[0][-160:]} (parallel.timeout_s={pcfg.timeout_s:g}, "
                f"init_timeout_s={pcfg.init_timeout_s:g}): another rank stopped responding or died")
        path = dump_stacks(run_dir, rank, f"{line}\n\n{traceback.format_exc()}")
        raise CollectiveFailure(f"{line}; stacks in {path}") from None
    finally:
        if distributed and dist.is_initialized() and not group_failed:
            dist.destroy_process_group()


def _device() -> torch.device:
    """This process's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    return device


def _threads(threads: int) -> int:
    """train.threads, or (0) this node's cores shared among its processes."""
    if threads > 0:
        return threads
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _join(backend: str, timeout: timedelta) -> None:
    """`init_process_group` with the start-up timeout. Under torchrun with restarts, a restarted worker group
    can read the previous attempt's addresses from the agent's shared store and fail to connect (seen with
    torch 2.13): the launchers set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each round); a bare
    torchrun without it gets one line saying so."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
        log0("torchrun --max-restarts with the agent's shared store: a restarted group may fail to reconnect; "
             "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/local.sh and the other launchers do)")
    dist.init_process_group(backend, timeout=timeout)


def _refuse_repeated_failure(run_dir: Path) -> None:
    """Under torchrun's in-job restarts (TORCHELASTIC_RESTART_COUNT > 0): stop at once when the previous
    attempt failed with an error that a restart repeats (status.json `failed`, retry false)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        return
    status = rundir.read_status(run_dir)
    if status.get("state") == "failed" and not status.get("retry", True):
        raise StopTraining(f"not retrying: the previous attempt failed with an error a restart repeats: "
                           f"{status.get('error')}")


__all__ = ["Signals", "run"]
