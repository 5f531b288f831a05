"""WebDataset streaming of image-caption shards and precomputed latent shards: split, shuffled, resumable.

    loader = make_image_loader(cfg)        # batches {"image" [B,3,H,W] in [-1,1], "text_ids", "text_mask", ...}
    loader = make_latent_loader(cfg)       # batches {"latent" [B,C,S,S], "text_emb" | "text_ids", "text_mask", ...}
    for batch in loader: ...               # an infinite stream unless cfg.epochs is set
    state = loader.state_dict()            # this rank's exact position (JSON): every worker's reader state
    loader.load_state_dict(state)          # the next batches are the ones an uninterrupted run would see
    loader.restore(states_of_all_ranks)    # the same at the same ranks x workers; elastic at any other

webdataset does the reading (brace patterns, local paths and pipe: URLs, tar parsing and key grouping);
the stream over it is data/stream.py: the epoch plan, each reader's exact position, and the
world-independent record of what an epoch has consumed (its docstring says what resume costs and what
the shuffle guarantees). Here: decoding, collation, bad samples (classified per reason, counted, logged,
skipped; the run stops with one clear message when the bad fraction passes data.max_bad_fraction), the
shard-list checks, and the main-process loader that keeps the position of the batches it has passed on.
A local shard that does not end with its end-of-archive blocks (cut inside a member header, which
tarfile reads as a normal end) loses its last sample, counted as `tar`.
No pickle decoding anywhere: samples that carry .pyd/.pickle/.pkl/.pt/.pth entries are rejected, and
npy/safetensors are read with np.load(allow_pickle=False) / safetensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from functools import partial

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data.config import DataConfig, data_shapes, text_encoder_path
from data.shardlist import check_shard_list
from data.stream import VERSION, ReaderState, ShardReader, merge_states, restored

log = logging.getLogger("data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pt", "pth")  # never decoded: pickle / torch.load payloads
# Why a sample was skipped: shard unreadable, tar corrupt or truncated, pickle entry, undecodable image,
# missing/empty caption, bad json, bad latent, bad text tensors.
BAD_REASONS = ("open", "tar", "pickle", "image", "caption", "json", "latent", "text")


class TooManyBadSamples(RuntimeError):
    """The fraction of bad samples passed DataConfig.max_bad_fraction."""


class BadSample(Exception):
    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


# ----------------------------------------------------------------------------------------- bad-sample book


def check_bad_fraction(good: int, bad: Counter, cfg: DataConfig, where: str = "") -> None:
    """Raise TooManyBadSamples if more than cfg.max_bad_fraction of the samples seen were bad (judged
    once cfg.min_samples_for_bad_check were seen)."""
    nbad = sum(bad.values())
    seen = good + nbad
    if seen >= max(1, cfg.min_samples_for_bad_check) and nbad > cfg.max_bad_fraction * seen:
        raise TooManyBadSamples(
            f"data{where}: {nbad} of {seen} samples were bad ({nbad / seen:.1%} > data.max_bad_fraction="
            f"{cfg.max_bad_fraction:.1%}); by reason: {dict(bad)}; shards: {cfg.shards}")


# ----------------------------------------------------------------------------------------- decoding


def _reject_unsafe(raw: dict) -> None:
    unsafe = [k for k in raw if not k.startswith("__") and k.rsplit(".", 1)[-1] in UNSAFE_EXTS]
    if unsafe:
        raise BadSample("pickle", f"unsafe entries {unsafe} (pickle/torch.load are never decoded)")


def _caption(raw: dict, required: bool) -> str:
    if "txt" not in raw:
        if required:
            raise BadSample("caption", "no .txt caption")
        return ""
    try:
        text = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("caption", f"caption is not utf-8: {e}") from None
    if required and not text:
        raise BadSample("caption", "empty caption")
    return text


def _meta(raw: dict):
    if "json" not in raw:
        return None
    try:
        return json.loads(raw["json"])
    except ValueError as e:
        raise BadSample("json", f"bad json: {e}") from None


def _load_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 [3, size, size]: shorter side resized to `size`, then center-cropped."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("RGB")
    except Exception as e:  # PIL raises many types on garbage input
        raise BadSample("image", f"undecodable image: {type(e).__name__}: {e}") from None
    if img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img).transpose(2, 0, 1).copy()  # [3, H, W]


def decode_image_sample(raw: dict, cfg: DataConfig) -> dict:
    _reject_unsafe(raw)
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise BadSample("image", "no image entry (jpg/png/webp)")
    return dict(image=_load_image(raw[ext], cfg.image_size), caption=_caption(raw, True), meta=_meta(raw),
                key=raw["__key__"])


def _npy(data: bytes) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    except Exception as e:
        raise BadSample("latent", f"bad npy: {type(e).__name__}: {e}") from None


def decode_latent_sample(raw: dict, cfg: DataConfig, expect_CSS: tuple[int, int, int], text_dim: int | None) -> dict:
    """Precomputed sample: a .safetensors entry {latent, text_emb | text_ids}, or latent.npy + text_*.npy."""
    import safetensors.torch

    _reject_unsafe(raw)
    if "safetensors" in raw:
        try:
            tensors = safetensors.torch.load(raw["safetensors"])
        except Exception as e:
            raise BadSample("latent", f"bad safetensors: {type(e).__name__}: {e}") from None
    else:
        tensors = {k[: -len(".npy")]: _npy(v) for k, v in raw.items() if k.endswith(".npy")}
    latent = tensors.get("latent")
    if latent is None or tuple(latent.shape) != tuple(expect_CSS) or not latent.is_floating_point():
        got = None if latent is None else (tuple(latent.shape), str(latent.dtype))
        raise BadSample("latent", f"latent {got}, expected float {tuple(expect_CSS)}")
    if not torch.isfinite(latent).all():
        raise BadSample("latent", "latent has non-finite values")
    out = dict(latent=latent.float(), caption=_caption(raw, False), meta=_meta(raw), key=raw["__key__"])
    if "text_emb" in tensors:
        emb = tensors["text_emb"]  # [L, Dt], truncated to the caption's length
        if emb.ndim != 2 or emb.shape[0] < 1 or (text_dim is not None and emb.shape[1] != text_dim):
            raise BadSample("text", f"text_emb {tuple(emb.shape)}, expected [L, {text_dim}]")
        out["text_emb"] = emb[: cfg.max_text_len]
    elif "text_ids" in tensors:
        ids = tensors["text_ids"]  # [L]
        if ids.ndim != 1 or ids.shape[0] < 1 or ids.is_floating_point():
            raise BadSample("text", f"text_ids {tuple(ids.shape)} {ids.dtype}, expected int [L]")
        out["text_ids"] = ids[: cfg.max_text_len].long()
    else:
        raise BadSample("text", "neither text_emb nor text_ids")
    return out


# ----------------------------------------------------------------------------------------- collation


def _pad_text(seqs: list[torch.Tensor], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length [L_i, ...] -> padded [B, max_len, ...] (zeros) and mask [B, max_len] (True = token)."""
    out = seqs[0].new_zeros((len(seqs), max_len) + tuple(seqs[0].shape[1:]))
    mask = torch.zeros(len(seqs), max_len, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask


def collate_images(samples: list[dict], tokenizer, max_len: int) -> dict:
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))  # uint8 [B, 3, H, W]
    captions = [s["caption"] for s in samples]
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return dict(image=images.float() / 127.5 - 1.0, text_ids=tok["input_ids"], text_mask=tok["attention_mask"].bool(),
                caption=captions, key=[s["key"] for s in samples], meta=[s["meta"] for s in samples])


def collate_latents(samples: list[dict], max_len: int) -> dict:
    out = dict(latent=torch.stack([s["latent"] for s in samples]), caption=[s["caption"] for s in samples],
               key=[s["key"] for s in samples], meta=[s["meta"] for s in samples])
    field = "text_emb" if "text_emb" in samples[0] else "text_ids"
    if any(field not in s for s in samples):
        raise ValueError("latent shards mix text_emb and text_ids samples; precompute them with one --text-storage")
    out[field], out["text_mask"] = _pad_text([s[field] for s in samples], max_len)
    return out


# ----------------------------------------------------------------------------------------- worker stream


def _tar_is_complete(url: str) -> bool:
    """A local tar ends with its end-of-archive blocks (two zero 512-byte blocks after the last member);
    a file cut inside a member header does not, although tarfile reads it without an error."""
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return True  # streams cannot be checked ahead
    size = os.path.getsize(url)
    if size < 1024 or size % 512:
        return False
    with open(url, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


class SampleTally:
    """Good and bad (per reason) samples of one worker, with the first few warnings per reason logged;
    `dropped`: good ones of its partial last batch that data.drop_last drops (read, never in a batch)."""

    def __init__(self, where: str, good: int = 0, bad: dict | None = None, dropped: int = 0):
        self.where, self.good, self.bad, self.warned = where, good, Counter(bad or {}), Counter()
        self.dropped = dropped

    def add_bad(self, reason: str, msg: str) -> None:
        self.bad[reason] += 1
        self.warned[reason] += 1
        if self.warned[reason] <= 3:
            log.warning("skipping bad sample%s [%s]: %s%s", self.where, reason, msg,
                        " (further ones of this kind are counted silently)" if self.warned[reason] == 3 else "")


def shard_samples(url: str, tally: SampleTally, count_from: float):
    """Raw samples of one shard in tar order. Errors (unreadable or corrupt tar, a cut header) are counted
    once, as `open` or `tar`, when they come at or after sample `count_from` (earlier ones were counted
    by the read that got there first)."""
    failed, yielded = [], 0

    def on_error(exn):
        if not failed and yielded >= count_from:
            reason = "open" if isinstance(exn, OSError) and "tar" not in type(exn).__name__.lower() else "tar"
            tally.add_bad(reason, f"{type(exn).__name__}: {exn}")
        failed.append(exn)
        return True

    complete = _tar_is_complete(url)
    prev = None
    for raw in wds.tariterators.tarfile_samples([dict(url=url)], handler=on_error):
        if prev is not None:
            yielded += 1
            yield prev
        prev = raw
    if prev is not None and (complete or failed):
        yield prev
    elif prev is not None:  # cut inside a header: the last sample may lack members
        if yielded >= count_from:
            tally.add_bad("tar", f"{url} ends without its end-of-archive blocks (truncated); its last sample "
                                 f"{prev.get('__key__')} is dropped")


class ShardStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: one reader (data/stream.py) over its shards, decoded and batched.

    Every batch carries "_pos": the worker's exact reader state and sample counts after it, so the main
    process knows what it has consumed.
    """

    def __init__(self, cfg: DataConfig, urls: list[str], rank: int, world: int, start: dict, worker_offset: int,
                 decode, collate):
        self.cfg, self.urls, self.rank, self.world = cfg, urls, rank, world
        self.start, self.worker_offset, self.decode, self.collate = start, worker_offset, decode, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        dl_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (dl_worker + self.worker_offset) % workers  # logical id: rotated so resumes keep batch order
        cfg, saved = self.cfg, self.start.get(worker)
        if saved is not None:
            state = ReaderState.from_dict(saved["reader"])
        else:
            state = ReaderState(self.rank + self.world * worker, self.world * workers, len(self.urls), cfg.seed)
        tally = SampleTally(f" (rank {self.rank} worker {worker})", **(saved or {}).get("counts", {}))

        def open_shard(shard, count_from=float("inf")):
            return shard_samples(self.urls[shard], tally, count_from)

        reader = ShardReader(state, open_shard, cfg.shuffle_buffer, cfg.shuffle_shards, cfg.resampled)

        def pos():
            counts = dict(good=tally.good, bad=dict(tally.bad), dropped=tally.dropped)
            return dict(reader=reader.snapshot(), counts=counts, worker=worker)

        batch, read_in_epoch = [], 0
        for raw in reader.samples():
            if raw is None:  # an epoch's items are all delivered
                fresh = all(i.upto == 0 and not i.pending for i in state.items)
                if read_in_epoch == 0 and state.items and fresh:
                    raise RuntimeError(f"data{tally.where}: epoch {state.epoch} read no samples from its "
                                       f"{len(state.items)} shards (first {self.urls[state.items[0].shard]}); "
                                       f"bad so far: {dict(tally.bad)}")
                read_in_epoch = 0
                if cfg.epochs is not None and state.epoch + 1 >= cfg.epochs:
                    break
                continue
            read_in_epoch += 1
            try:
                sample = self.decode(raw)
            except BadSample as e:
                tally.add_bad(e.reason, f"{raw.get('__key__')} in {raw.get('__url__')}: {e}")
                continue
            tally.good += 1
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                yield dict(self.collate(batch), _pos=pos())
                batch = []
        if batch and not cfg.drop_last:
            yield dict(self.collate(batch), _pos=pos())
            batch = []
        tally.dropped += len(batch)  # a partial last batch that data.drop_last drops
        yield dict(_pos=pos(), _end=True)  # final counts (bad samples after the last batch, dropped ones)


# ----------------------------------------------------------------------------------------- main-process loader


def _url_digest(urls: list[str]) -> str:
    return hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]


class ShardLoader:
    """Iterable of batches with state_dict() / load_state_dict() (this rank, exact) and restore() (every
    rank's saved state: exact at the same ranks and workers, elastic otherwise)."""

    def __init__(self, cfg: DataConfig, decode, collate, rank: int | None = None, world_size: int | None = None,
                 transform=None):
        cfg.validate()
        if rank is None or world_size is None:
            rank, world_size = wds.utils.pytorch_worker_info()[:2]  # RANK/WORLD_SIZE env or torch.distributed
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.decode, self.collate, self.transform = decode, collate, transform
        self.urls = check_shard_list(cfg, world_size)
        self.workers = max(1, cfg.num_workers)
        self.positions: dict[int, dict] = {}  # logical worker -> {"reader", "counts"} after its last batch
        self.carried = dict(good=0, bad={})  # counts of an elastic restart's saved ranks assigned to this one
        self.next_worker = 0

    def __iter__(self):
        ds = ShardStream(self.cfg, self.urls, self.rank, self.world, dict(self.positions), self.next_worker,
                         self.decode, self.collate)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                         pin_memory=torch.cuda.is_available())
        for batch in dl:
            pos = batch.pop("_pos")
            worker = pos.pop("worker")
            self.positions[worker] = pos
            stats = self.stats()
            check_bad_fraction(stats["good"], Counter(stats["bad"]), self.cfg, f" (rank {self.rank})")
            if batch.pop("_end", False):
                continue  # a finite stream's last word: no samples
            self.next_worker = (worker + 1) % self.workers  # DataLoader serves workers round-robin
            yield self.transform(batch) if self.transform else batch

    def stats(self) -> dict:
        """Good and bad (per reason) sample counts of this rank so far (this run and the ones it resumed)."""
        bad = Counter(self.carried["bad"])
        for p in self.positions.values():
            bad.update(p["counts"]["bad"])
        good = self.carried["good"] + sum(p["counts"]["good"] for p in self.positions.values())
        return dict(good=good, bad=dict(bad))

    def report(self) -> str:
        s = self.stats()
        nbad = sum(s["bad"].values())
        return f"data rank {self.rank}: {s['good']} good samples, {nbad} bad {s['bad'] or ''}".rstrip()

    def state_dict(self) -> dict:
        """This rank's position (plain JSON). Ranks differ: checkpoint it under a per-rank key, since
        torch.distributed.checkpoint keeps one copy of a non-tensor value that every rank saves under one key."""
        return dict(version=VERSION, rank=self.rank, world_size=self.world, num_workers=self.workers,
                    seed=self.cfg.seed, shards=len(self.urls), urls=_url_digest(self.urls),
                    next_worker=self.next_worker, carried=self.carried,
                    workers={str(w): p for w, p in self.positions.items()})

    def _check_same_data(self, state: dict) -> None:
        for name, mine in (("version", VERSION), ("seed", self.cfg.seed), ("shards", len(self.urls)),
                           ("urls", _url_digest(self.urls))):
            if state.get(name) != mine:
                raise ValueError(f"data state: saved {name}={state.get(name)!r} but this loader has {mine!r}; "
                                 "resuming needs the same shard list (data.shards) and data.seed")

    def load_state_dict(self, state: dict) -> None:
        """Resume this rank exactly at `state` (saved by the same rank at the same world size and workers)."""
        self._check_same_data(state)
        for name, mine in (("world_size", self.world), ("rank", self.rank), ("num_workers", self.workers)):
            if state.get(name) != mine:
                raise ValueError(f"data state: saved {name}={state.get(name)} but this loader has {mine}; use "
                                 "restore() with every rank's state to resume at another world size or workers")
        self.positions = {int(w): p for w, p in state["workers"].items()}
        self.carried = state.get("carried", dict(good=0, bad={}))
        self.next_worker = int(state["next_worker"])

    def restore(self, states: list[dict]) -> str:
        """Resume from every saved rank's state_dict(): exactly when ranks and workers are the same, else
        elastically (data/stream.py: the epoch's remaining samples are dealt to this run's readers, each
        delivered once). Returns "exact" or "elastic"."""
        for s in states:
            self._check_same_data(s)
        if len(states) == self.world and states[0]["num_workers"] == self.workers:
            self.load_state_dict(next(s for s in states if s["rank"] == self.rank))
            return "exact"
        readers = []
        for s in states:
            for w in range(s["num_workers"]):
                p = s["workers"].get(str(w))
                readers.append(p["reader"] if p else ReaderState(s["rank"] + s["world_size"] * w,
                                                                   s["world_size"] * s["num_workers"],
                                                                   len(self.urls), self.cfg.seed).as_dict())
        self.positions, self.next_worker = {}, 0
        if self.cfg.resampled:  # draws with replacement: continue with the next round
            epoch = max(r["epoch"] for r in readers) + 1
            new = [ReaderState(self.rank + self.world * w, self.world * self.workers, len(self.urls), self.cfg.seed,
                               epoch=epoch) for w in range(self.workers)]
        else:
            work = merge_states(readers, len(self.urls), self.cfg.shuffle_shards)
            new = [restored(self.rank + self.world * w, self.world * self.workers, len(self.urls), self.cfg.seed,
                            work) for w in range(self.workers)]
        for w, state in enumerate(new):
            self.positions[w] = dict(reader=state.as_dict(), counts=dict(good=0, bad={}))
        good, bad, dropped = 0, Counter(), 0
        for s in states:  # saved rank q's counts go to rank q % world: the totals are kept
            if s["rank"] % self.world == self.rank:
                total = saved_counts(s)
                good, bad, dropped = good + total["good"], bad + Counter(total["bad"]), dropped + total["dropped"]
        self.carried = dict(good=good, bad=dict(bad), dropped=dropped)
        return "elastic"


def saved_counts(state: dict) -> dict:
    """Good and bad (per reason) samples of a saved `ShardLoader.state_dict()`, those it carries included;
    `dropped`: good ones of its readers' partial last batches (data.drop_last), read but never in a batch."""
    carried = state.get("carried", {})
    bad, good, dropped = Counter(carried.get("bad", {})), carried.get("good", 0), carried.get("dropped", 0)
    for p in state["workers"].values():
        good += p["counts"]["good"]
        bad.update(p["counts"]["bad"])
        dropped += p["counts"].get("dropped", 0)
    return dict(good=good, bad=dict(bad), dropped=dropped)


def delivered_samples(state: dict) -> int:
    """Good samples handed out in batches up to a saved `ShardLoader.state_dict()` (over every run it
    resumed, per reader): read ones less those of dropped partial last batches."""
    counts = saved_counts(state)
    return counts["good"] - counts["dropped"]


def make_image_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                      transform=None) -> ShardLoader:
    """Image-caption shards -> batches {"image": float [B,3,H,W] in [-1,1], "text_ids": long [B,L],
    "text_mask": bool [B,L], "caption": list[str], "key": list[str], "meta": list[dict|None]}.

    `transform(batch) -> batch` runs in the main process, e.g. FrozenEncoders (adds "latent", "text_emb").
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_path(cfg))
    return ShardLoader(cfg, partial(decode_image_sample, cfg=cfg),
                       partial(collate_images, tokenizer=tokenizer, max_len=cfg.max_text_len), rank, world_size,
                       transform)


def make_latent_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                       transform=None, check_text_dim: bool = True) -> ShardLoader:
    """Precomputed latent shards -> batches {"latent": float [B,C,S,S], "text_emb": [B,L,Dt] (stored dtype,
    padded with zeros) or "text_ids": long [B,L], "text_mask": bool [B,L], "caption", "key", "meta"}.

    Latents of the wrong shape (for cfg's VAE and image size) are skipped and counted as "latent". The
    encoder settings come from the shards' manifest.json when there is one (data/manifest.py).
    """
    from data.manifest import apply_manifest

    cfg = apply_manifest(cfg)
    shapes = data_shapes(cfg)
    css = (shapes.latent_channels, shapes.latent_size, shapes.latent_size)
    decode = partial(decode_latent_sample, cfg=cfg, expect_CSS=css,
                     text_dim=shapes.text_dim if check_text_dim else None)
    return ShardLoader(cfg, decode, partial(collate_latents, max_len=cfg.max_text_len), rank, world_size, transform)


def make_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None, transform=None) -> ShardLoader:
    """make_image_loader or make_latent_loader, by cfg.kind."""
    make = make_image_loader if cfg.kind == "image" else make_latent_loader
    return make(cfg, rank, world_size, transform)
