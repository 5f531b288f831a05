"""The data side of a training step: each step's micro-batches fetched one step ahead, so that the end of a
finite stream can be agreed in the step's all-reduce, and the counts of good and bad samples the metrics
report."""

from __future__ import annotations

import torch

from data.shards import BAD_REASONS, delivered_samples


class StepBatches:
    """The micro-batches of each optimizer step, fetched one step ahead: a rank whose finite stream has
    ended says so in the step's all-reduce (parallel/distributed.py reduce_step), so every rank stops after
    the same step instead of one rank leaving a collective the others wait in. `data_state` is the loader's
    position after the batches handed out by `take` (what a checkpoint records), not after the ones fetched
    ahead. Too many bad samples raise the loader's `TooManyBadSamples`."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum
        self.batches = iter(loader)
        self.data_state = loader.state_dict()
        self.ahead: list = []
        self.out_of_data = False  # the stream ended before a whole step's micro-batches
        self.fetch()

    def fetch(self) -> None:
        """Fetch the next step's micro-batches (`out_of_data` when the stream ends first)."""
        self.ahead = []
        for _ in range(self.accum):
            try:
                self.ahead.append(next(self.batches))
            except StopIteration:
                self.out_of_data = True
                return

    def take(self) -> list:
        """The fetched micro-batches of this step (the loader's position moves past them)."""
        batches, self.ahead = self.ahead, []
        self.data_state = self.loader.state_dict()
        return batches

    def unread(self) -> int:
        """Good samples of this rank's stream that no step trained on: fetched ahead, in a last partial batch
        (data.drop_last), or not yet read (read now, without the loader's transform, to count them)."""
        self.loader.transform = None
        for _ in self.batches:
            pass
        return self.loader.stats()["good"] - self.trained()

    def trained(self) -> int:
        """Good samples of this rank's stream (over every run it resumed) in the batches `take` handed out."""
        return delivered_samples(self.data_state)


def data_counts(loader, device: torch.device) -> torch.Tensor:
    """This rank's good and bad (by reason, BAD_REASONS order) samples read so far."""
    stats = loader.stats()
    return torch.tensor([stats["good"]] + [stats["bad"].get(r, 0) for r in BAD_REASONS], dtype=torch.float64,
                        device=device)


def named_counts(values: list[float]) -> dict:
    """`data_counts` (of one rank, or summed over ranks) as {"data/good": n, "data/bad/<reason>": n}."""
    values = [int(v) for v in values]
    return {"data/good": values[0], **{f"data/bad/{r}": v for r, v in zip(BAD_REASONS, values[1:])}}


__all__ = ["StepBatches", "data_counts", "named_counts"]
