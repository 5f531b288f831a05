"""WebDataset streaming of image-caption shards and precomputed latent shards: split, shuffled, resumable.

    loader = make_image_loader(cfg)        # batches {"image" [B,3,H,W] in [-1,1], "text_ids", "text_mask", ...}
    loader = make_latent_loader(cfg)       # batches {"latent" [B,C,S,S], "text_emb" | "text_ids", "text_mask", ...}
    for batch in loader: ...               # an infinite stream unless cfg.epochs is set
    state = loader.state_dict()            # position: per worker (epoch, samples consumed, bad counts)
    loader.load_state_dict(state)          # the next batches are the ones an uninterrupted run would see

Reading uses webdataset (shard lists with brace patterns / local paths / pipe: URLs, tar parsing, the
shuffle buffer). Three small pieces are ours, because webdataset 1.0.2 has no mid-epoch resume:
  * the shard order of an epoch is a pure function of (seed, epoch) and the split takes shard i of that
    order on rank i % world and worker (i // world) % workers -- the islice rule of wds.split_by_node /
    wds.split_by_worker, applied with explicit ids: the rank is resolved once in the main process and the
    worker id is rotated on resume so batches keep their round-robin order across a restart;
  * every worker counts the raw samples it has passed on in the current epoch; a resumed worker rebuilds
    the same deterministic stream (same shards, same shuffle seed) and skips that many samples *before*
    decoding them (cost: re-reading, not re-decoding, the consumed part of the current epoch);
  * bad samples are classified per reason, counted, logged and skipped; the run stops with one clear
    message when the bad fraction passes cfg.max_bad_fraction.
No pickle decoding anywhere: samples that carry .pyd/.pickle/.pkl/.pt/.pth entries are rejected, and
npy/safetensors are read with np.load(allow_pickle=False) / safetensors.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data.config import DataConfig, data_shapes, text_encoder_path

log = logging.getLogger("data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pt", "pth")  # never decoded: pickle / torch.load payloads
REASONS = ("open", "tar", "pickle", "image", "caption", "json", "latent", "text")


class TooManyBadSamples(RuntimeError):
    """The fraction of bad samples passed DataConfig.max_bad_fraction."""


class BadSample(Exception):
    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


# ----------------------------------------------------------------------------------------- bad-sample book


class Position:
    """One worker's place in the stream: epoch, raw samples passed on in it, good/bad sample counts."""

    def __init__(self, epoch=0, consumed=0, good=0, bad=None):
        self.epoch, self.consumed, self.good, self.bad = epoch, consumed, good, Counter(bad or {})

    def as_dict(self) -> dict:
        return dict(epoch=self.epoch, consumed=self.consumed, good=self.good, bad=dict(self.bad))


def check_bad_fraction(good: int, bad: Counter, cfg: DataConfig, where: str = "") -> None:
    """Raise TooManyBadSamples if more than cfg.max_bad_fraction of the samples seen were bad."""
    nbad = sum(bad.values())
    seen = good + nbad
    if seen >= max(1, cfg.min_samples_for_bad_check) and nbad > cfg.max_bad_fraction * seen:
        raise TooManyBadSamples(
            f"data{where}: {nbad} of {seen} samples were bad ({nbad / seen:.1%} > max_bad_fraction "
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


def expand_shards(shards) -> list[str]:
    """Brace patterns ("a-{000..009}.tar", "::"-joined), local paths or pipe: URLs -> list of URLs."""
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [u for s in shards for u in wds.shardlists.expand_urls(s)]
    if not urls or not all(urls):
        raise ValueError(f"DataConfig.shards: no shards in {shards!r}")
    return urls


def epoch_shards(urls: list[str], cfg: DataConfig, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
    """The shards (rank, worker) reads in `epoch`: deterministic in (seed, epoch), disjoint across readers."""
    if cfg.resampled:  # with replacement, every reader from all shards, as wds.ResampledShards
        rng = random.Random(f"{cfg.seed}/{epoch}/{rank}/{worker}")
        n = max(1, -(-len(urls) // (world * workers)))
        return [urls[rng.randrange(len(urls))] for _ in range(n)]
    order = list(urls)
    if cfg.shuffle_shards:
        random.Random(f"{cfg.seed}/{epoch}").shuffle(order)  # same order on every rank
    return order[rank::world][worker::workers]  # = wds.split_by_node then wds.split_by_worker


def _error_source(exn: Exception) -> str | None:
    """The tar stream an exception from webdataset's tar reader came from, or None.

    webdataset tags member errors as "<msg> @ <stream>" and stream errors with args (..., stream, url).
    """
    args = getattr(exn, "args", ())
    if args and isinstance(args[0], str) and " @ " in args[0]:
        return args[0].rsplit(" @ ", 1)[1]
    if len(args) >= 2 and args[-2] is not None and not isinstance(args[-2], str):
        return str(args[-2])
    return None


class ShardStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: reads its shards, skips to its saved position, decodes and batches.

    Every batch carries "_pos" (the worker's Position after it) so the main process knows what it consumed.
    """

    def __init__(self, cfg: DataConfig, urls: list[str], rank: int, world: int, start: dict, worker_offset: int,
                 decode, collate):
        self.cfg, self.urls, self.rank, self.world = cfg, urls, rank, world
        self.start, self.worker_offset, self.decode, self.collate = start, worker_offset, decode, collate

    def _pipeline(self, shards: list[str], epoch: int, worker: int, on_error):
        stages = [wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=on_error)]
        if self.cfg.shuffle_buffer > 0:
            rng = random.Random(f"{self.cfg.seed}/{epoch}/{self.rank}/{worker}/samples")
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        dl_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (dl_worker + self.worker_offset) % workers  # logical id: rotated so resumes keep batch order
        pos = Position(**self.start.get(worker, {}))
        skip, cfg, where = pos.consumed, self.cfg, f" (rank {self.rank} worker {worker})"
        warned = Counter()

        def bad(reason, msg):
            pos.bad[reason] += 1
            warned[reason] += 1
            if warned[reason] <= 3:
                log.warning("skipping bad sample%s [%s]: %s%s", where, reason, msg,
                            " (further ones of this kind are counted silently)" if warned[reason] == 3 else "")
            check_bad_fraction(pos.good, pos.bad, cfg, where)

        broken = set()

        def on_error(exn):  # webdataset handler: a shard that cannot be opened or a truncated/corrupt tar
            source = _error_source(exn)
            if source is not None and source in broken:
                return True  # one broken tar raises twice (bad member, then the stream): count it once
            broken.add(source)
            if pos.consumed >= skip:  # errors before the resume point were counted by the first run
                reason = "open" if isinstance(exn, OSError) and "tar" not in type(exn).__name__.lower() else "tar"
                bad(reason, f"{type(exn).__name__}: {exn}")
            return True  # continue with the next shard

        batch = []
        while cfg.epochs is None or pos.epoch < cfg.epochs:
            shards = epoch_shards(self.urls, cfg, pos.epoch, self.rank, self.world, worker, workers)
            if not shards:
                raise ValueError(f"DataConfig.shards: {len(self.urls)} shards < {self.world} ranks x {workers} workers")
            pos.consumed = 0
            for raw in self._pipeline(shards, pos.epoch, worker, on_error):
                pos.consumed += 1
                if pos.consumed <= skip:
                    continue  # resume: consumed before the checkpoint; skipped undecoded
                try:
                    sample = self.decode(raw)
                except BadSample as e:
                    bad(e.reason, f"{raw.get('__key__')} in {raw.get('__url__')}: {e}")
                    continue
                pos.good += 1
                batch.append(sample)
                if len(batch) == cfg.batch_size:
                    yield dict(self.collate(batch), _pos=dict(pos.as_dict(), worker=worker))
                    batch = []
            if pos.consumed == 0:
                raise RuntimeError(f"data{where}: epoch {pos.epoch} yielded no samples from {len(shards)} shards "
                                   f"(first {shards[0]}); bad so far: {dict(pos.bad)}")
            skip, pos.epoch, pos.consumed = 0, pos.epoch + 1, 0  # a whole epoch consumed
        if batch and not cfg.drop_last:
            yield dict(self.collate(batch), _pos=dict(pos.as_dict(), worker=worker))
        yield dict(_pos=dict(pos.as_dict(), worker=worker), _end=True)  # final counts (bad samples after the last batch)


# ----------------------------------------------------------------------------------------- main-process loader


class ShardLoader:
    """Iterable of batches with state_dict()/load_state_dict() for the stream position (per rank)."""

    def __init__(self, cfg: DataConfig, decode, collate, rank: int | None = None, world_size: int | None = None,
                 transform=None):
        cfg.validate()
        if rank is None or world_size is None:
            rank, world_size = wds.utils.pytorch_worker_info()[:2]  # RANK/WORLD_SIZE env or torch.distributed
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.decode, self.collate, self.transform = decode, collate, transform
        self.urls = expand_shards(cfg.shards)
        self.workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(self.urls) < world_size * self.workers:
            raise ValueError(f"DataConfig.shards: {len(self.urls)} shards < {world_size} ranks x {self.workers} workers; "
                             "write more shards, lower num_workers or set resampled=True")
        self.positions: dict[int, dict] = {}  # logical worker -> Position.as_dict() after its last consumed batch
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
        """Good and bad (per reason) sample counts of this rank so far."""
        bad = Counter()
        for p in self.positions.values():
            bad.update(p["bad"])
        return dict(good=sum(p["good"] for p in self.positions.values()), bad=dict(bad))

    def report(self) -> str:
        s = self.stats()
        nbad = sum(s["bad"].values())
        return f"data rank {self.rank}: {s['good']} good samples, {nbad} bad {s['bad'] or ''}".rstrip()

    def state_dict(self) -> dict:
        """This rank's position (plain ints/dicts). Ranks differ: checkpoint it under a per-rank key, since
        torch.distributed.checkpoint keeps one copy of a non-tensor value that every rank saves under one key."""
        return dict(version=1, rank=self.rank, world_size=self.world, num_workers=self.workers, seed=self.cfg.seed,
                    shards=len(self.urls), next_worker=self.next_worker,
                    workers={str(w): dict(p) for w, p in self.positions.items()})

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`. The split must match: same shards, world size, rank, workers and seed."""
        for name, mine in (("world_size", self.world), ("rank", self.rank), ("num_workers", self.workers),
                           ("seed", self.cfg.seed), ("shards", len(self.urls))):
            if state.get(name) != mine:
                raise ValueError(f"data state: saved {name}={state.get(name)} but this loader has {mine}; "
                                 "an exact resume needs the same shards, ranks, workers and seed")
        self.positions = {int(w): dict(p, bad=dict(p["bad"])) for w, p in state["workers"].items()}
        self.next_worker = int(state["next_worker"])


def make_image_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                      transform=None) -> ShardLoader:
    """Image-caption shards -> batches {"image": float [B,3,H,W] in [-1,1], "text_ids": long [B,L],
    "text_mask": bool [B,L], "caption": list[str], "key": list[str], "meta": list[dict|None]}.

    `transform(batch) -> batch` runs in the main process, e.g. FrozenEncoders (adds "latent", "text_emb").
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_path(cfg))
    return ShardLoader(cfg, _Bind(decode_image_sample, cfg), _Bind(collate_images, tokenizer, cfg.max_text_len),
                       rank, world_size, transform)


def make_latent_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                       transform=None, check_text_dim: bool = True) -> ShardLoader:
    """Precomputed latent shards -> batches {"latent": float [B,C,S,S], "text_emb": [B,L,Dt] (stored dtype,
    padded with zeros) or "text_ids": long [B,L], "text_mask": bool [B,L], "caption", "key", "meta"}.

    Latents of the wrong shape (for cfg's VAE and image size) are skipped and counted as "latent".
    """
    shapes = data_shapes(cfg)
    css = (shapes.latent_channels, shapes.latent_size, shapes.latent_size)
    decode = _Bind(decode_latent_sample, cfg, css, shapes.text_dim if check_text_dim else None)
    return ShardLoader(cfg, decode, _Bind(collate_latents, max_len=cfg.max_text_len), rank, world_size, transform)


def make_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None, transform=None) -> ShardLoader:
    """make_image_loader or make_latent_loader, by cfg.kind."""
    make = make_image_loader if cfg.kind == "image" else make_latent_loader
    return make(cfg, rank, world_size, transform)


class _Bind:
    """Picklable partial(f, *args)(x) with x first (DataLoader workers may be spawned)."""

    def __init__(self, f, *args, **kw):
        self.f, self.args, self.kw = f, args, kw

    def __call__(self, x):
        return self.f(x, *self.args, **self.kw)
