"""The one owner of a run's checkpoints: step directories, their names (train/rundir.py), file records and
verification, publishing, pruning and the choice of the checkpoint to resume from; beside it, train/rundir.py
writes the run's status.json and failure log.

Layout of a run's checkpoint root:

    step_00001000/            a complete checkpoint (only complete ones carry this name)
        ...                   the engine's files: DCP shards (.metadata, *.distcp) or DeepSpeed's
        train/rank00000.json  per-rank train state (step, schedule, RNG, data position): JSON, no pickle
        config.json           the run's resolved config (if given)
        meta.json             step, world size, engine, time, and every other file's size and CRC-32;
                              written last
    .tmp-step_00002000/       a save in progress (or killed): ignored, removed by the next Checkpointer

A save is written into `.tmp-step_*` and published by an atomic rename once every rank has finished, so a
kill at any moment leaves the last good checkpoint loadable. The engines plug in as a storage: a writer /
reader pair of their model and optimizer state (`DCPStorage` here: sharded, resharding on load at any world
and expert-parallel size, optionally async, the publish then happening at the next `save` or `wait`;
train/backends.py `DeepSpeedStorage`).

Before the publish the ranks share out the hashing of the checkpoint's files (`record_files`), so that a
checkpoint damaged later (a truncated, altered or lost file) is recognised before anything is loaded from it
(`verify`), and a resume falls back to an older whole one (`Checkpointer.resume_point`). The per-rank train
state is restored only when the world size is unchanged (otherwise `load` returns None for it).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, \
    set_state_dict

from data.jsonio import write_json_atomic

from . import rundir
from .failures import StopTraining
from .rundir import META, PART_PREFIX, TMP_PREFIX, complete_checkpoints, step_name, tmp_name, train_state_file


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dist_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def dist_barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- RNG state as JSON --------------------------------------------------------------------------

def encode_state(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text."""
    return base64.b64encode(t.numpy().tobytes()).decode()


def decode_state(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict:
    """This rank's RNG states (torch CPU and CUDA, Python, NumPy) as a JSON-able dict."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": encode_state(torch.get_rng_state()), "python": repr(random.getstate()),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = [encode_state(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    import ast
    torch.set_rng_state(decode_state(state["torch"]))
    random.setstate(ast.literal_eval(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_state(s) for s in state["cuda"]])


# ---- file records and verification (collective) -------------------------------------------------

def record_files(path: str | Path) -> dict[str, list[int]] | None:
    """{relative path: [size, CRC-32]} of every file of a written checkpoint (rundir.checkpoint_files), for its
    meta.json; collective, on a filesystem every rank sees. Rank r hashes files[r::world] into a part file
    in the checkpoint; rank 0 merges the parts, removes them and returns the record (other ranks: None)."""
    path = Path(path)
    rank, world = dist_rank(), dist_world()
    dist_barrier()  # every rank's files are written
    files = rundir.checkpoint_files(path)
    mine = {rel: list(rundir.file_digest(path / rel)) for rel in files[rank::world]}
    write_json_atomic(path / f"{PART_PREFIX}{rank:05d}.json", mine)
    dist_barrier()
    if rank != 0:
        return None
    record: dict[str, list[int]] = {}
    for r in range(world):
        part = path / f"{PART_PREFIX}{r:05d}.json"
        record.update(json.loads(part.read_text()))
        part.unlink()
    for rel in files:  # a file another rank's listing missed
        if rel not in record:
            record[rel] = list(rundir.file_digest(path / rel))
    return dict(sorted(record.items()))


def verify(path: str | Path) -> str | None:
    """Whether a checkpoint is whole: None, or one line naming the damage (rundir.describe). Collective: rank
    r checks the recorded files r, r + world, ... and the ranks agree on the first damaged one, so every rank
    returns the same answer."""
    code = rundir.first_damage(path, dist_rank(), dist_world())
    if dist_world() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        agreed = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        code = int(agreed.item())
    return rundir.describe(path, code)


def latest_whole(checkpoints: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of `checkpoints` (oldest first, as `complete_checkpoints` lists them), or
    None, and the newer damaged ones with `verify`'s reason, newest first; collective."""
    damaged = []
    for path in reversed(checkpoints):
        reason = verify(path)
        if reason is None:
            return path, damaged
        damaged.append((path, reason))
    return None, damaged


def saved_train_states(path: str | Path) -> list[dict]:
    """Every rank's JSON train state of a checkpoint (train/rankNNNNN.json), in rank order."""
    files = sorted((Path(path) / rundir.TRAIN_STATES).glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


# ---- the engines' storage ------------------------------------------------------------------------

class DCPStorage:
    """Model + optimizer and `extra` tensor dicts (e.g. the EMA weights, sharded like the model) through
    torch.distributed.checkpoint: FQN-keyed and DTensor-aware (`get_state_dict` / `set_state_dict`), so
    a load reshards to any world and expert-parallel size."""

    engine = "torch"

    def __init__(self, async_save: bool = False):
        self.async_save = async_save

    def write(self, folder: Path, model, optimizer=None, extra: dict | None = None) -> Future | None:
        state = {**_app_state(model, optimizer), **(extra or {})}
        if self.async_save:
            return dcp.async_save(state, checkpoint_id=str(folder))
        dcp.save(state, checkpoint_id=str(folder))
        return None

    def read(self, folder: Path, model, optimizer=None, extra: dict | None = None) -> None:
        """Load into an already parallelized model and, in place, into the `extra` tensor dicts."""
        state = {**_app_state(model, optimizer), **(extra or {})}
        dcp.load(state, checkpoint_id=str(folder))
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


# ---- checkpointer -------------------------------------------------------------------------------

class Checkpointer:
    """Save / find / verify / load the step checkpoints under `root` (see module docstring) through
    `storage` (default: DCP)."""

    def __init__(self, root: str | Path, keep_last: int = 3, async_save: bool = False, storage=None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last
        self.storage = storage if storage is not None else DCPStorage(async_save)
        self._pending: tuple[Future, int, dict] | None = None
        if dist_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(TMP_PREFIX + "*"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
        dist_barrier()

    # -- listing --
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def resume_point(self, resume: str) -> tuple[Path | None, str | None]:
        """(the checkpoint to resume from, a line naming the damaged newer ones skipped) for train.resume:
        "none", "auto" (the newest whole checkpoint) or a path; collective. Nothing is loaded from a
        damaged checkpoint: StopTraining when auto finds only damaged ones or the given path is damaged."""
        if resume == "none":
            return None, None
        if resume != "auto":
            why = verify(resume)
            if why is not None:
                raise StopTraining(f"checkpoint {resume} is damaged ({why})")
            return Path(resume), None
        path, damaged = latest_whole(self.checkpoints())
        damage = "; ".join(f"checkpoint {p} is damaged ({why})" for p, why in damaged) or None
        if damaged and path is None:
            raise StopTraining(f"{damage}: no whole checkpoint to resume from (train.resume=none starts afresh)")
        return path, damage

    # -- saving --
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             train_state: dict | None = None, config: dict | None = None,
             extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Save model + optimizer and `extra` tensor dicts through the storage, and this rank's JSON-able
        `train_state`; collective."""
        self.wait()
        tmp = self.root / tmp_name(step)
        if dist_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / rundir.TRAIN_STATES).mkdir(parents=True)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
        dist_barrier()
        future = self.storage.write(tmp, model, optimizer, extra)
        train_state_file(tmp, dist_rank()).write_text(json.dumps(train_state or {}))
        meta = {"step": step, "world_size": dist_world(), "engine": self.storage.engine}
        if future is not None:
            self._pending = (future, step, meta)
        else:
            self._publish(step, meta)

    def wait(self) -> None:
        """Finish a pending async save and publish it."""
        if self._pending is not None:
            future, step, meta = self._pending
            self._pending = None
            future.result()
            self._publish(step, meta)

    close = wait

    def _publish(self, step: int, meta: dict) -> None:
        tmp, final = self.root / tmp_name(step), self.root / step_name(step)
        files = record_files(tmp)  # after a barrier: every rank's shards are written
        if dist_rank() == 0:
            write_json_atomic(tmp / META, {**meta, "time": time.time(), "files": files})
            if final.exists():  # re-saving the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            _fsync_dir(self.root)
            for old in self.checkpoints()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist_barrier()

    # -- loading --
    def load(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict | None:
        """Load through the storage (any world / EP size for DCP) and, in place, into the `extra` tensor
        dicts; returns this rank's train state, or None when the checkpoint was written at another world
        size."""
        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no meta.json)")
        self.storage.read(path, model, optimizer, extra)
        meta = json.loads((path / META).read_text())
        rank_file = train_state_file(path, dist_rank())
        if meta["world_size"] != dist_world() or not rank_file.is_file():
            return None
        return json.loads(rank_file.read_text())
