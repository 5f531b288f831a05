"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and safetensors export.

Layout of a run's checkpoint root:

    step_00001000/            a complete checkpoint (only complete ones carry this name)
        .metadata, *.distcp   model + optimizer, sharded (DTensor shards reshard on load)
        train/rank00000.json  per-rank train state (step, schedule, RNG, data position): JSON, no pickle
        config.json           the run's resolved config (if given)
        meta.json             step, world size, time, and every other file's size and CRC-32; written last
    .tmp-step_00002000/       a save in progress (or killed): ignored, removed by the next Checkpointer

A save is written into `.tmp-step_*` and published by an atomic rename once every rank has finished,
so a kill at any moment leaves the last good checkpoint loadable. With `async_save`, DCP writes in a
background thread and the publish happens at the next `save`, `wait` or `close`.

Before the publish the ranks share out the hashing of the checkpoint's files (`record_files`), so that a
checkpoint damaged later (a truncated, altered or lost file) is recognised before anything is loaded from it
(`verify`), and a resume can fall back to an older whole one (`latest_whole`). The DeepSpeed engine
(train/backends.py) records its files the same way.

Loading works at any world size and expert-parallel size: model and optimizer state go through
`get_state_dict` / `set_state_dict` (FQN-keyed, DTensor-aware), so DCP reshards. The per-rank train
state is restored only when the world size is unchanged (otherwise `load` returns None for it).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from model.config import DiTConfig, config_from_dict, config_to_dict
from model.dit import DiT, build_model

STEP_PREFIX, TMP_PREFIX = "step_", ".tmp-step_"
META, PART_PREFIX = "meta.json", ".files-rank"  # PART_PREFIX: record_files' per-rank parts, merged into META
HASH_CHUNK = 1 << 22


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


# ---- file records and verification ----------------------------------------------------------------

def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename: the file is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in chunks."""
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def checkpoint_files(path: str | Path) -> list[str]:
    """The files of a checkpoint directory that its meta.json records: relative '/'-paths, sorted; all but
    meta.json itself and `record_files`' per-rank parts."""
    path = Path(path)
    out = []
    for folder, _, names in os.walk(path):
        for name in names:
            rel = (Path(folder) / name).relative_to(path).as_posix()
            if rel != META and not rel.startswith(PART_PREFIX) and rel != META + ".tmp":
                out.append(rel)
    return sorted(out)


def record_files(path: str | Path) -> dict[str, list[int]] | None:
    """{relative path: [size, CRC-32]} of every file of a written checkpoint (`checkpoint_files`), for its
    meta.json; collective, on a filesystem every rank sees. Rank r hashes files[r::world] into a part file
    in the checkpoint; rank 0 merges the parts, removes them and returns the record (other ranks: None)."""
    path = Path(path)
    rank, world = dist_rank(), dist_world()
    dist_barrier()  # every rank's files are written
    files = checkpoint_files(path)
    mine = {rel: list(file_digest(path / rel)) for rel in files[rank::world]}
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
            record[rel] = list(file_digest(path / rel))
    return dict(sorted(record.items()))


_WHOLE = 1 << 62
_META_MISSING, _META_BAD = -2, -1
_FILE_MISSING, _FILE_SIZE, _FILE_CRC = 1, 2, 3


def _damage(file: Path, size: int, crc: int) -> int:
    """0 when the file has the recorded size and CRC-32, else which damage (_FILE_*)."""
    try:
        if file.stat().st_size != size:
            return _FILE_SIZE
        return 0 if file_digest(file) == (size, crc) else _FILE_CRC
    except OSError:
        return _FILE_MISSING


def verify(path: str | Path) -> str | None:
    """Whether a checkpoint is whole: None, or one line naming the damage, e.g. "__1_0.distcp: 1234 bytes,
    2468 recorded" or "model.distcp: checksum differs from the one recorded at save". Collective: rank r
    checks the recorded files r, r + world, ... (size first, then CRC-32) and the ranks agree on the first
    damaged one, so every rank returns the same answer. A missing, unreadable or malformed meta.json is
    damage; a checkpoint whose meta.json records no files (saved before files were recorded) is accepted
    as it is."""
    path = Path(path)
    rank, world = dist_rank(), dist_world()
    recorded: list[tuple[str, int, int]] = []
    code = _WHOLE
    try:
        meta = json.loads((path / META).read_text())
        recorded = sorted((str(rel), int(size), int(crc)) for rel, (size, crc) in meta.get("files", {}).items())
    except FileNotFoundError:
        code = _META_MISSING
    except (OSError, ValueError, TypeError, AttributeError):
        code = _META_BAD
    if code == _WHOLE:
        for i in range(rank, len(recorded), world):
            kind = _damage(path / recorded[i][0], recorded[i][1], recorded[i][2])
            if kind:
                code = 4 * i + kind
                break
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        agreed = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        code = int(agreed.item())
    if code == _WHOLE:
        return None
    if code == _META_MISSING:
        return f"{META}: missing"
    if code == _META_BAD:
        return f"{META}: unreadable, not JSON, or its file record is malformed"
    index, kind = divmod(code, 4)
    rel, size, _ = recorded[index]
    if kind == _FILE_SIZE:
        try:
            return f"{rel}: {(path / rel).stat().st_size} bytes, {size} recorded"
        except OSError:
            kind = _FILE_MISSING
    if kind == _FILE_MISSING:
        return f"{rel}: missing or unreadable"
    return f"{rel}: checksum differs from the one recorded at save"


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


# ---- checkpointer -------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """`step_*` directories under `root` that were published (meta.json is written last), oldest first;
    whether they are whole is `verify`'s question."""
    found = [p for p in Path(root).glob(STEP_PREFIX + "*")
             if (p / META).is_file() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


class Checkpointer:
    """Save / find / load sharded checkpoints under `root` (see module docstring)."""

    def __init__(self, root: str | Path, keep_last: int = 3, async_save: bool = False):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
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

    # -- saving --
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             train_state: dict | None = None, config: dict | None = None,
             extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Save model + optimizer (sharded), `extra` tensor dicts (e.g. the EMA weights, sharded like the
        model) and this rank's JSON-able `train_state`; collective."""
        self.wait()
        tmp = self.root / f"{TMP_PREFIX}{step:08d}"
        if dist_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "train").mkdir(parents=True)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
        dist_barrier()
        state = {**_app_state(model, optimizer), **(extra or {})}
        (tmp / "train" / f"rank{dist_rank():05d}.json").write_text(json.dumps(train_state or {}))
        meta = {"step": step, "world_size": dist_world()}
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), step, meta)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
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
        tmp, final = self.root / f"{TMP_PREFIX}{step:08d}", self.root / f"{STEP_PREFIX}{step:08d}"
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
        """Load into an already parallelized model (any world / EP size) and, in place, into the `extra`
        tensor dicts; returns this rank's train state, or None when the checkpoint was written at another
        world size."""
        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no meta.json)")
        state = {**_app_state(model, optimizer), **(extra or {})}
        dcp.load(state, checkpoint_id=str(path))
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = json.loads((path / META).read_text())
        rank_file = path / "train" / f"rank{dist_rank():05d}.json"
        if meta["world_size"] != dist_world() or not rank_file.is_file():
            return None
        return json.loads(rank_file.read_text())


def saved_train_states(path: str | Path) -> list[dict]:
    """Every rank's JSON train state of a checkpoint (train/rankNNNNN.json), in rank order."""
    files = sorted((Path(path) / "train").glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


# ---- inference weights --------------------------------------------------------------------------

EMA_KEY = "ema"  # the `extra` dict under which the torch engine saves the EMA of the parameters
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A step checkpoint written by the DeepSpeed engine (train/backends.py DeepSpeedBackend)."""
    meta = Path(path) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("engine") == "deepspeed"


def saved_ema_names(path: str | Path) -> dict[str, str]:
    """{parameter FQN: saved key} of the EMA tensors a step checkpoint holds; empty when it has none
    (train.ema_decay=0). The trainer keys the EMA by the parallelized model's parameter names, so wrapper
    prefixes are dropped here."""
    if is_deepspeed_checkpoint(path):
        from parallel.deepspeed import saved_ema_names as deepspeed_ema_names
        return deepspeed_ema_names(path)
    if not (Path(path) / ".metadata").is_file():
        return {}
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {}
    for key in keys:
        if key.startswith(EMA_KEY + "."):
            name = key[len(EMA_KEY) + 1:]
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            out[name] = key[len(EMA_KEY) + 1:]
    return out


def load_weights(path: str | Path, model: DiT, ema: bool) -> None:
    """Load a DCP step checkpoint into an unsharded model for inference, single process.

    The checkpoint holds the raw model state ("model": parameters and buffers) and, from the torch engine
    with train.ema_decay > 0, the EMA of the parameters only ("ema"). With `ema` the parameters come from
    the EMA; the buffers always come from the raw model state, among them the routers' dynamic-inference
    thresholds (`threshold_E`: an EMA, decay model.moe.threshold_decay, of the raw weights' training-time
    cut-off scores; no EMA-weight counterpart is saved) and the fixed `pos_embed`."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):  # parallel/deepspeed.py full_state_dict: the same weights and buffers
        from parallel.deepspeed import load_fp32_weights
        load_fp32_weights(model, path.parent, path.name, ema=ema)
        return
    params = dict(model.named_parameters())
    state = {"model": get_model_state_dict(model)}
    if ema:
        saved = saved_ema_names(path)
        if set(saved) != set(params):
            raise ValueError(f"checkpoint {path}: its EMA tensors do not match the model's parameters "
                             f"({len(saved)} saved, {len(params)} in the model)")
        state["model"] = {k: v for k, v in state["model"].items() if k not in params}
        state[EMA_KEY] = {saved[n]: p.detach() for n, p in params.items()}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not ema))


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


# ---- safetensors export -------------------------------------------------------------------------

def export_safetensors(model: DiT, out_dir: str | Path, weights: str = "raw") -> Path | None:
    """Consolidated, unsharded weights (+ config JSON) of a possibly sharded model; collective.
    Rank 0 writes `model.safetensors` and `config.json` and returns the file path. `weights` ("raw" or
    "ema": which weights the model holds) is recorded in the safetensors metadata."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_to_dict(model.cfg)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_file(tensors, out / "model.safetensors", metadata={"config": json.dumps(cfg), "weights": weights})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out / "model.safetensors"


def exported_weights(path: str | Path) -> str:
    """Which weights an export holds: "ema" or "raw" (also for exports written before this was recorded)."""
    path = Path(path)
    with safe_open(path if path.is_file() else path / "model.safetensors", framework="pt") as f:
        return (f.metadata() or {}).get("weights", "raw")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """Build the model described by an export's config.json and load its weights (strictly)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg: DiTConfig = config_from_dict(json.loads((folder / "config.json").read_text()))
    state = load_file(folder / "model.safetensors", device=str(device))
    model = build_model(cfg, device=device).to(next(iter(state.values())).dtype)  # the stored dtype
    model.load_state_dict(state, strict=True)
    return model
