"""The run directory's on-disk protocol: names, the run's status, the failure log and the test of a whole
checkpoint. Torch-free: launch/requeue.py reads it in the batch shell after the trainers have exited.
train/checkpoint.py's `Checkpointer` writes through it; nothing else spells these names.

    RUN_DIR/
        status.json              finished | stopped | failed (with error, retry): the run's end
        failures.jsonl           one line per failed job attempt (launch/requeue.py)
        stalls/rankNNNNN.txt     the stacks of a rank that gave up on a stuck peer or step
        comm_trace/rank_*        the NCCL flight recorder's dumps
        checkpoints/
            step_00001000/       a published checkpoint; meta.json, written last, records every other
                                 file's size and CRC-32
            .tmp-step_00002000/  a save in progress (or killed)
        metrics.jsonl, samples/, wandb/, .hydra/
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from data.jsonio import write_json_atomic

STATUS, FAILURES, STALLS, COMM_TRACE, CHECKPOINTS = "status.json", "failures.jsonl", "stalls", "comm_trace", "checkpoints"
STEP_PREFIX, TMP_PREFIX = "step_", ".tmp-step_"
META, PART_PREFIX = "meta.json", ".files-rank"  # PART_PREFIX: record_files' per-rank parts, merged into META
TRAIN_STATES = "train"  # per-rank train states: train/rankNNNNN.json
STATES = ("finished", "stopped", "failed")
HASH_CHUNK = 1 << 22


def step_name(step: int) -> str:
    """`step_00001000`: the directory name of a published checkpoint."""
    return f"{STEP_PREFIX}{step:08d}"


def tmp_name(step: int) -> str:
    return f"{TMP_PREFIX}{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a `step_*` directory, or None for any other name."""
    digits = Path(path).name[len(STEP_PREFIX):]
    return int(digits) if Path(path).name.startswith(STEP_PREFIX) and digits.isdigit() else None


def train_state_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / TRAIN_STATES / f"rank{rank:05d}.json"


def stall_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / STALLS / f"rank{rank:05d}.txt"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """`step_*` directories under `root` that were published (meta.json is written last), oldest first;
    whether they are whole is `first_damage`'s question."""
    found = [p for p in Path(root).glob(STEP_PREFIX + "*") if (p / META).is_file() and step_of(p) is not None]
    return sorted(found, key=step_of)


# ---- status and failures --------------------------------------------------------------------------

def read_status(run_dir: str | Path) -> dict:
    """`run_dir/status.json`, or {} when there is none or it cannot be read."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: str | Path, state: str, **fields) -> Path:
    """`run_dir/status.json`: `finished` (the last step is done, or the finite data stream ended), `stopped`
    (a signal ended the run early, after its checkpoint), or `failed` (with `error` and `retry`: whether a
    restart from the latest checkpoint can help). Launchers read it to decide whether to requeue."""
    if state not in STATES:
        raise ValueError(f"status {state!r} is not one of {STATES}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return write_json_atomic(Path(run_dir) / STATUS, {"state": state, **fields})


def read_failures(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/failures.jsonl`, oldest first."""
    log = Path(run_dir) / FAILURES
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def append_failure(run_dir: str | Path, row: dict) -> list[dict]:
    """Append one failed attempt to `run_dir/failures.jsonl` (one line, one write); every row, oldest first."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / FAILURES, "a") as f:
        f.write(json.dumps(row) + "\n")
    return read_failures(run_dir)


# ---- file records: what makes a checkpoint whole -------------------------------------------------

def file_digest(path: str | Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in chunks."""
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def checkpoint_files(path: str | Path) -> list[str]:
    """The files of a checkpoint directory that its meta.json records: relative '/'-paths, sorted; all but
    meta.json itself, its temporary files and `record_files`' per-rank parts."""
    path = Path(path)
    out = []
    for folder, _, names in os.walk(path):
        for name in names:
            rel = (Path(folder) / name).relative_to(path).as_posix()
            if not rel.startswith((META, PART_PREFIX)):
                out.append(rel)
    return sorted(out)


WHOLE = 1 << 62  # `first_damage`'s code of a whole checkpoint (the largest, so ranks agree by a minimum)
_META_MISSING, _META_BAD = -2, -1
_FILE_MISSING, _FILE_SIZE, _FILE_CRC = 1, 2, 3


def _recorded(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    try:
        meta = json.loads((path / META).read_text())
        return WHOLE, sorted((str(rel), int(size), int(crc)) for rel, (size, crc) in meta.get("files", {}).items())
    except FileNotFoundError:
        return _META_MISSING, []
    except (OSError, ValueError, TypeError, AttributeError):
        return _META_BAD, []


def _file_damage(file: Path, size: int, crc: int, checksums: bool) -> int:
    try:
        if file.stat().st_size != size:
            return _FILE_SIZE
        return 0 if not checksums or file_digest(file) == (size, crc) else _FILE_CRC
    except OSError:
        return _FILE_MISSING


def first_damage(path: str | Path, rank: int = 0, world: int = 1, checksums: bool = True) -> int:
    """A code of the first damage among the recorded files rank, rank + world, ... of a checkpoint (size
    first, then CRC-32 unless `checksums` is off), WHOLE when there is none: ranks that share the files out
    agree on the minimum of their codes, which `describe` turns into a line. A checkpoint whose meta.json
    records no files (saved before files were recorded) is whole as it is."""
    code, recorded = _recorded(Path(path))
    if code != WHOLE:
        return code
    for i in range(rank, len(recorded), world):
        kind = _file_damage(Path(path) / recorded[i][0], recorded[i][1], recorded[i][2], checksums)
        if kind:
            return 4 * i + kind
    return WHOLE


def describe(path: str | Path, code: int) -> str | None:
    """None for WHOLE, else one line naming the damage, e.g. "__1_0.distcp: 1234 bytes, 2468 recorded"."""
    if code == WHOLE:
        return None
    if code == _META_MISSING:
        return f"{META}: missing"
    if code == _META_BAD:
        return f"{META}: unreadable, not JSON, or its file record is malformed"
    index, kind = divmod(code, 4)
    rel, size, _ = _recorded(Path(path))[1][index]
    if kind == _FILE_SIZE:
        try:
            return f"{rel}: {(Path(path) / rel).stat().st_size} bytes, {size} recorded"
        except OSError:
            kind = _FILE_MISSING
    if kind == _FILE_MISSING:
        return f"{rel}: missing or unreadable"
    return f"{rel}: checksum differs from the one recorded at save"


def damage(path: str | Path, checksums: bool = True) -> str | None:
    """Whether a checkpoint is whole, in one process: None, or the line naming its first damage."""
    return describe(path, first_damage(path, checksums=checksums))


def newest_whole(root: str | Path, checksums: bool = True) -> Path | None:
    """The newest published checkpoint under `root` that is whole, in one process; None if there is none."""
    for path in reversed(complete_checkpoints(root)):
        if damage(path, checksums) is None:
            return path
    return None


__all__ = ["STATUS", "FAILURES", "CHECKPOINTS", "META", "STEP_PREFIX", "TMP_PREFIX", "WHOLE", "append_failure",
           "checkpoint_files", "complete_checkpoints", "damage", "describe", "file_digest", "first_damage",
           "newest_whole", "read_failures", "read_status", "stall_file", "step_name", "step_of",
           "train_state_file", "write_json_atomic", "write_status"]
