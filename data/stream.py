"""Elastic, resumable sample streams over tar shards: the epoch plan, each reader's exact position, and
the world-independent record of what an epoch has consumed.

Readers. Rank r of W, DataLoader worker w of K is reader i = r + W*w of R = W*K, and in a fresh epoch it
reads items[i::R] of the epoch's shard order (the islice rule of wds.split_by_node + wds.split_by_worker).
The order of epoch e is a permutation of the shard list seeded by (seed, e). A reader reads its items one
after the other (webdataset's tar iterator and key grouping) into a shuffle buffer of
`cfg.shuffle_buffer` raw samples (drained at the end of the epoch) and passes on a random one per sample
read, as wds.shuffle does.

Position. Every sample is named by (shard, index in the shard's tar order). An item is a shard together
with the samples of it still to deliver: the indices in `pending` and every index >= `upto` (a fresh
shard: upto 0, nothing pending). A reader's state holds its items for the epoch, how far it has read,
the names of the samples in its buffer and the buffer's RNG state: plain JSON, O(shards per reader +
buffer).

Resume at the same W and K: every reader continues exactly where it was (the same batches as an
uninterrupted run). It re-reads only the shard in progress and the shards with samples still in its
buffer (skipping undecoded what was delivered), never a shard it has finished.
Resume at another W or K (`merge_states` + `ReaderState.elastic`): the items of all saved readers,
with what each has delivered taken out, are the epoch's remaining work; it is dealt round-robin, in
epoch order, to the new readers. Every sample is delivered exactly once per epoch across any number of
such restarts; the re-read is bounded the same way (about one shard per saved reader). Readers that had
reached the next epoch hand their part of it over the same way.

Why our own: webdataset 1.0.2 has no resumable stream; megatron-energon, litdata and Mosaic streaming
resume elastically only over their own indexed formats (energon's .nv-meta, litdata chunks, MDS), and
wids needs a per-shard index. This reads img2dataset tars as they are.

The shuffle: shard order is a fresh permutation every epoch; samples mix within a buffer of B raw
samples across a reader's consecutive shards (a sample moves at most ~B positions early, unboundedly
late). Cost: B raw samples held per worker. After an elastic restart the rest of that epoch's order
differs from the uninterrupted one (still a permutation of the remaining samples).
`cfg.resampled` (shards drawn with replacement, for infinite streams) resumes exactly at the same
readers; at others it continues with the next round of draws (sampling with replacement has no
"exactly once").
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

VERSION = 2


@dataclass
class Item:
    """A shard of a reader's epoch and the samples still to deliver: indices in `pending` and >= `upto`."""

    shard: int
    upto: int = 0
    pending: list[int] = field(default_factory=list)

    def wants(self, index: int, pending: set[int]) -> bool:
        return index >= self.upto or index in pending

    def as_list(self) -> list:
        return [self.shard, self.upto, list(self.pending)]

    @classmethod
    def of(cls, v: list) -> "Item":
        return cls(int(v[0]), int(v[1]), [int(i) for i in v[2]])


def epoch_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The shard order of `epoch`: the same on every rank and worker."""
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def resampled_shards(n_shards: int, seed: int, epoch: int, reader: int, readers: int) -> list[int]:
    """One round of shards drawn with replacement for a reader (as wds.ResampledShards)."""
    rng = random.Random(f"{seed}/{epoch}/{reader}/{readers}")
    return [rng.randrange(n_shards) for _ in range(max(1, -(-n_shards // readers)))]


def _rng_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_of(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class ReaderState:
    """One reader's exact place: epoch, items, read position, buffer contents (names) and buffer RNG."""

    reader: int
    readers: int
    n_shards: int
    seed: int
    epoch: int = 0
    items: list[Item] = field(default_factory=list)
    queued: dict[int, list[Item]] = field(default_factory=dict)  # later epochs dealt by an elastic restore
    next_item: int = 0  # items[:next_item] have been opened
    offset: int = 0  # samples read of items[next_item - 1] (the shard in progress) when `reading`
    reading: bool = False
    lengths: dict[int, int] = field(default_factory=dict)  # samples of the shards read to their end
    buffer: list[tuple[int, int]] = field(default_factory=list)  # (shard, index), in buffer order
    rng: list | None = None
    started: bool = False  # items are set for `epoch`

    def as_dict(self) -> dict:
        return dict(version=VERSION, reader=self.reader, readers=self.readers, n_shards=self.n_shards,
                    seed=self.seed, epoch=self.epoch, items=[i.as_list() for i in self.items],
                    queued={str(e): [i.as_list() for i in v] for e, v in self.queued.items()},
                    next_item=self.next_item, offset=self.offset, reading=self.reading,
                    lengths={str(k): v for k, v in self.lengths.items()}, buffer=[list(b) for b in self.buffer],
                    rng=self.rng, started=self.started)

    @classmethod
    def from_dict(cls, d: dict) -> "ReaderState":
        if d.get("version") != VERSION:
            raise ValueError(f"data state version {d.get('version')} is not {VERSION}: it was written by "
                             "another version of data/stream.py")
        return cls(reader=d["reader"], readers=d["readers"], n_shards=d["n_shards"], seed=d["seed"],
                   epoch=d["epoch"], items=[Item.of(v) for v in d["items"]],
                   queued={int(e): [Item.of(v) for v in items] for e, items in d["queued"].items()},
                   next_item=d["next_item"], offset=d["offset"], reading=d["reading"],
                   lengths={int(k): v for k, v in d["lengths"].items()},
                   buffer=[(int(s), int(i)) for s, i in d["buffer"]], rng=d["rng"], started=d["started"])

    def remaining(self) -> dict[int, list[Item]]:
        """What this reader has yet to deliver, by epoch: its current items less what it delivered, and
        the items queued for later epochs."""
        out = {}
        if self.started:
            out[self.epoch] = self._current_remaining()
        for e, items in self.queued.items():
            out[e] = [dataclasses.replace(i) for i in items]
        return out

    def _current_remaining(self) -> list[Item]:
        in_buffer: dict[int, list[int]] = {}
        for shard, index in self.buffer:
            in_buffer.setdefault(shard, []).append(index)
        out = []
        for j, item in enumerate(self.items):
            if j >= self.next_item:  # not opened yet
                out.append(dataclasses.replace(item, pending=list(item.pending)))
                continue
            buffered = sorted(in_buffer.get(item.shard, []))
            if j == self.next_item - 1 and self.reading:  # in progress: the unread part is still to come
                later = [i for i in item.pending if self.offset <= i < item.upto]
                out.append(Item(item.shard, max(self.offset, item.upto), sorted(set(buffered) | set(later))))
            elif buffered:  # read to its end; some samples still in the buffer
                out.append(Item(item.shard, self.lengths[item.shard], buffered))
        return out


def _fresh(state: ReaderState, epoch: int, shuffle: bool) -> list[Item]:
    return [Item(i) for i in epoch_order(state.n_shards, state.seed, epoch, shuffle)[state.reader::state.readers]]


def merge_states(states: list[dict], n_shards: int, shuffle: bool) -> dict[int, list[Item]]:
    """The remaining work of the epochs the saved readers were in, from all readers' states (any W, K):
    by epoch, the items not yet fully delivered, in epoch order. A shard absent from an epoch's list has
    been delivered in it; a reader that had not reached an epoch still owes its fresh share of it."""
    readers = [ReaderState.from_dict(s) for s in states]
    if not readers:
        return {}
    total = readers[0].readers
    if sorted(r.reader for r in readers) != list(range(total)) or any(r.readers != total for r in readers):
        raise ValueError(f"data state: expected the states of readers 0..{total - 1}, got "
                         f"{sorted(r.reader for r in readers)}")
    if any(r.n_shards != n_shards for r in readers):
        raise ValueError(f"data state: saved with {readers[0].n_shards} shards, the shard list now has {n_shards}")
    owed = [r.remaining() for r in readers]
    first = min(r.epoch for r in readers)
    last = max(max(o, default=r.epoch) for r, o in zip(readers, owed))
    work = {}
    for e in range(first, last + 1):
        items = []
        for r, o in zip(readers, owed):
            if e in o:
                items += o[e]
            elif e > r.epoch or (e == r.epoch and not r.started):
                items += _fresh(r, e, shuffle)
        position = {s: k for k, s in enumerate(epoch_order(n_shards, readers[0].seed, e, shuffle))}
        work[e] = sorted(items, key=lambda item: position[item.shard])
    return work


def restored(reader: int, readers: int, n_shards: int, seed: int, work: dict[int, list[Item]]) -> ReaderState:
    """A new reader's state after an elastic restart: items[reader::readers] of every epoch's remaining
    work (`merge_states`), starting at the first of those epochs."""
    queued = {e: items[reader::readers] for e, items in work.items()}
    return ReaderState(reader, readers, n_shards, seed, epoch=min(work, default=0), queued=queued)


class ShardReader:
    """Iterates one reader's raw samples (tar order through the shuffle buffer); `snapshot()` is its
    exact state after the samples yielded so far. `open_shard(shard, count_errors_from=inf)` iterates a
    shard's raw samples in tar order. `samples()` yields None at the end of each epoch."""

    def __init__(self, state: ReaderState, open_shard, buffer_size: int, shuffle: bool, resampled: bool):
        self.state, self.open_shard = state, open_shard
        self.buffer_size, self.shuffle, self.resampled = buffer_size, shuffle, resampled
        self._rng: random.Random | None = None

    def snapshot(self) -> dict:
        if self._rng is not None:
            self.state.rng = _rng_json(self._rng)
        return self.state.as_dict()

    def _start_epoch(self) -> None:
        s = self.state
        if s.epoch in s.queued:
            s.items = s.queued.pop(s.epoch)
        elif self.resampled:
            s.items = [Item(i) for i in resampled_shards(s.n_shards, s.seed, s.epoch, s.reader, s.readers)]
        else:
            s.items = _fresh(s, s.epoch, self.shuffle)
        s.next_item, s.offset, s.reading, s.lengths, s.buffer, s.started = 0, 0, False, {}, [], True
        s.rng = _rng_json(random.Random(f"{s.seed}/{s.epoch}/{s.reader}/{s.readers}/samples"))

    def _refill(self) -> list[dict]:
        """The raw samples named in the saved buffer, re-read from their shards (only those shards)."""
        s = self.state
        wanted: dict[int, set[int]] = {}
        for shard, index in s.buffer:
            wanted.setdefault(shard, set()).add(index)
        found = {}
        for shard, indices in wanted.items():
            last = max(indices)
            for index, raw in enumerate(self.open_shard(shard)):
                if index in indices:
                    found[shard, index] = raw
                if index >= last:
                    break
        missing = [b for b in s.buffer if b not in found]
        if missing:
            raise ValueError(f"data state: samples {missing[:3]} of the saved shuffle buffer are not in their "
                             "shards any more (were the shards rewritten?)")
        return [found[b] for b in s.buffer]

    def _read_current(self):
        """(shard, index, raw) of the wanted samples of the shard in progress, from its saved offset."""
        s = self.state
        item = s.items[s.next_item - 1]
        pending = set(item.pending)
        # Errors before where this shard's earlier reads got were counted by those reads.
        for index, raw in enumerate(self.open_shard(item.shard, max(s.offset, item.upto))):
            if index < s.offset:
                continue  # delivered before the restart (or not wanted): skipped undecoded
            s.offset = index + 1
            if item.wants(index, pending):
                yield item.shard, index, raw
        s.lengths[item.shard] = s.offset
        s.reading = False

    def _read(self):
        """(shard, index, raw) of every wanted sample of the remaining items, in order."""
        s = self.state
        if s.reading:
            yield from self._read_current()
        while s.next_item < len(s.items):
            s.next_item, s.offset, s.reading = s.next_item + 1, 0, True
            yield from self._read_current()

    def samples(self):
        while True:
            s = self.state
            if not s.started:
                self._start_epoch()
            self._rng = _rng_of(s.rng)
            held = self._refill()
            for shard, index, raw in self._read():
                held.append(raw)
                s.buffer.append((shard, index))
                if len(held) > self.buffer_size:
                    yield self._pop(held)
            while held:
                yield self._pop(held)
            yield None
            s.epoch, s.started = s.epoch + 1, False

    def _pop(self, held: list[dict]) -> dict:
        s = self.state
        k = self._rng.randrange(len(held))
        held[k], held[-1] = held[-1], held[k]
        s.buffer[k], s.buffer[-1] = s.buffer[-1], s.buffer[k]
        s.buffer.pop()
        return held.pop()
