"""TrainState: what besides weights and optimizer a resumed run needs to continue exactly.

Per rank, JSON-able (the checkpoint stores it as train/rankNNNNN.json): step, the non-finite-loss
counters, samples seen, the LR schedule, this rank's RNG states and its data-loader position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    nan_streak: int = 0  # non-finite losses in a row (the run stops at train.max_nan_steps)
    nan_total: int = 0
    schedule: dict = field(default_factory=dict)  # LR scheduler state_dict
    rng: dict = field(default_factory=dict)  # train.checkpoint.capture_rng()
    data: dict = field(default_factory=dict)  # the loader's state_dict()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
