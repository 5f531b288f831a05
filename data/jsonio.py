"""JSON files that are whole or absent: the project's one atomic JSON writer (shard manifests, checkpoint
metadata, the run's status). Torch-free, so that launch/requeue.py can use it in a batch shell."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, obj, indent: int | None = None) -> Path:
    """Write `obj` as JSON to `path` through a temporary file of this process, fsync and a rename: readers
    see the old file or the new one, never a part; several processes may write the same path at once."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


__all__ = ["write_json_atomic"]
