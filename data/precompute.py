"""Image shards -> latent shards with the frozen encoders, over any number of processes (CLI: python -m
data.precompute --help; torchrun --nproc_per_node=N -m data.precompute ...; launch/slurm/precompute.sbatch).

Each output sample: `safetensors` = {"latent": [C, S, S] (fp32 or bf16), and either "text_emb": bf16 [L_i, Dt]
truncated to the caption's L_i tokens (--text-storage emb) or "text_ids": int32 [L_i] (--text-storage ids)},
plus the caption (txt) and the input's json. The output shard of input `.../name.tar` is `OUT/name.tar`
with the input's samples in order, so the output does not depend on the number of processes.

Distributed and resumable per shard: rank r of W (RANK / WORLD_SIZE, as torchrun or srun set them; no
process group) encodes input shards r, r + W, ... on its own device (cuda:LOCAL_RANK when there is a GPU);
--workers DataLoader workers per rank read and decode them (a whole shard each, in file order).
A shard is written under `name.tar.tmp`, its counts go to `OUT/.precompute/name.tar.json`, then the shard
is renamed: a killed run leaves no partial shard under a final name, and a rerun skips every shard whose
output and counts exist (OUT/.precompute/settings.json refuses a rerun with other settings). Rank 0
shows the progress of all ranks (shards done, ETA), waits until every shard is finished and merges the
counts into OUT/manifest.json: settings, latent shape and dtype, text storage, text encoder and width,
samples, bad samples by reason, bytes per sample, throughput (read by data/manifest.py at training time).

The storage trade-off (printed at the end with measured sizes): per sample,
  emb: latent (C*S*S*b) + L*Dt*2 bytes   -- no text encoder at train time; storage dominated by text
  ids: latent (C*S*S*b) + L*4 bytes      -- the text encoder runs online in training (its FLOPs and memory)
At the paper's scale (256 px -> 32x32x8 latents = 16 KiB in bf16; a T5 encoder's output of L = 120 tokens x
Dt = 2048 dims in bf16 = 480 KiB, more with longer captions or wider T5) the embeddings are 30-100x the latents:
1.2B samples need ~0.6 PB and more with emb vs ~20 TB with ids (the paper gives neither L nor Dt exactly).
So at scale: store ids and run the frozen T5 online; for small runs with a cheap encoder (MiniLM, 384 dims)
either works, and emb removes the text encoder from the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter

import numpy as np

import torch

from data.config import DataConfig, data_shapes, text_dim
from data.encoders import load_text_encoder, load_vae
from data.manifest import write_manifest
from data.shardlist import expand_shards
from data.shards import BadSample, SampleTally, check_bad_fraction, decode_image_sample, shard_samples

LATENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _read_shard(url: str, cfg: DataConfig, tally: SampleTally):
    """Decoded image samples of one shard in file order, with the loader's rules for bad data: bad samples
    and broken tars (also cut inside a header) are counted in `tally` per reason and skipped."""
    for raw in shard_samples(url, tally, 0):
        try:
            yield decode_image_sample(raw, cfg), raw.get("json")
        except BadSample as e:
            tally.add_bad(e.reason, f"{raw.get('__key__')}: {e}")


def encode_batch(images_B3HW: torch.Tensor, captions: list[str], text, vae, storage: str,
                 latent_dtype: torch.dtype) -> list[dict]:
    """uint8 images + captions -> per-sample tensors to store: latent [C,S,S] and text_emb [L_i,Dt] / text_ids [L_i]."""
    latents = vae.encode(images_B3HW.float() / 127.5 - 1.0).to("cpu", latent_dtype)  # [B, C, S, S]
    ids, mask = text.tokenize(captions)  # [B, L]
    lengths = mask.sum(1).tolist()
    if storage == "emb":
        emb = text.encode(ids, mask).to("cpu", torch.bfloat16)  # [B, L, Dt]
        texts = [dict(text_emb=emb[i, :n].contiguous()) for i, n in enumerate(lengths)]
    else:
        texts = [dict(text_ids=ids[i, :n].to(torch.int32).contiguous()) for i, n in enumerate(lengths)]
    return [dict(latent=latents[i].contiguous(), **t) for i, t in enumerate(texts)]


class ShardBatches(torch.utils.data.IterableDataset):
    """Decoded batches of whole shards for a DataLoader: worker w reads shards w, w + workers, ... of `todo`,
    each in file order, so a shard's batches are the same with any number of workers. Items: {"name",
    "images": uint8 [B, 3, H, W], "captions", "keys", "jsons"}, and after a shard's last batch {"name",
    "end": True, "bad": counts by reason}."""

    def __init__(self, todo: list[tuple[str, str]], cfg: DataConfig):
        self.todo, self.cfg = todo, cfg

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url, name in self.todo[worker::workers]:
            tally, pending = SampleTally(f" ({url})"), []
            for item in _read_shard(url, self.cfg, tally):
                pending.append(item)
                if len(pending) == self.cfg.batch_size:
                    yield self._batch(name, pending)
                    pending = []
            if pending:
                yield self._batch(name, pending)
            yield dict(name=name, end=True, bad=dict(tally.bad))

    @staticmethod
    def _batch(name: str, pending: list) -> dict:
        return dict(name=name, images=torch.from_numpy(np.stack([s["image"] for s, _ in pending])),
                    captions=[s["caption"] for s, _ in pending], keys=[s["key"] for s, _ in pending],
                    jsons=[js for _, js in pending])


# ----------------------------------------------------------------------------------------- naming and state

STATE_DIR = ".precompute"  # OUT/.precompute: settings.json and one counts file per finished shard
_TAR_NAME = re.compile(r"([^/\s'\"]+?)(\.tar\.gz|\.tgz|\.tar)$")


def shard_name(url: str) -> str:
    """Output file name of an input shard: the base name of its last `*.tar` (`.tar.gz`, `.tgz`) path, also
    inside a pipe: command ("pipe:aws s3 cp s3://b/x/000123.tar -" -> "000123.tar")."""
    for token in reversed(url.split()):
        m = _TAR_NAME.search(token.rsplit("/", 1)[-1])
        if m:
            return m.group(1) + ".tar"
    raise ValueError(f"--input: cannot name an output shard after {url!r} (no *.tar path in it)")


def output_names(inputs: list[str]) -> list[str]:
    """Output shard names, one per input, unique."""
    names = [shard_name(u) for u in inputs]
    seen = {}
    for url, name in zip(inputs, names):
        if name in seen:
            raise ValueError(f"--input: {seen[name]!r} and {url!r} both give the output shard {name!r}")
        seen[name] = url
    return names


def output_pattern(spec: str, out: str, names: list[str]) -> str:
    """A data.shards value for the outputs: the input's brace pattern moved to `out` when it names them
    exactly, else the output paths joined with '::'."""
    paths = [os.path.join(out, n) for n in names]
    if isinstance(spec, str) and "::" not in spec:
        try:
            pattern = os.path.join(out, shard_name(spec))
            if expand_shards(pattern) == paths:
                return pattern
        except ValueError:
            pass
    return "::".join(paths)


def _settings(cfg: DataConfig, storage: str, latent_dtype: str) -> dict:
    """What the latents depend on (local model directories made absolute, so training finds them anywhere)."""
    def where(path):
        return os.path.abspath(path) if path and os.path.isdir(path) else path

    return dict(text_encoder=cfg.text_encoder, text_encoder_path=where(cfg.text_encoder_path), vae=cfg.vae,
                vae_path=where(cfg.vae_path), image_size=cfg.image_size, max_text_len=cfg.max_text_len,
                text_storage=storage, latent_dtype=latent_dtype)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _check_settings(out: str, settings: dict, overwrite: bool) -> None:
    """Record the run's settings in OUT/.precompute/settings.json; refuse other settings unless overwrite."""
    path = os.path.join(out, STATE_DIR, "settings.json")
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(f"--output {out} holds shards made with other settings {old}; use --overwrite or "
                             "another dir")
        return
    _write_json(path, settings)


class Finished:
    """Which output shards are complete with the current settings: the shard and its counts file exist."""

    def __init__(self, out: str, names: list[str], settings: dict):
        self.out, self.names, self.settings = out, names, settings
        self.stats: dict[str, dict] = {}

    def poll(self) -> int:
        """Read the counts of newly finished shards; returns how many are finished."""
        counted, shards = set(os.listdir(os.path.join(self.out, STATE_DIR))), set(os.listdir(self.out))
        for name in self.names:
            if name in self.stats or f"{name}.json" not in counted or name not in shards:
                continue
            with open(os.path.join(self.out, STATE_DIR, f"{name}.json")) as f:
                stats = json.load(f)
            if stats.get("settings") == self.settings:
                self.stats[name] = stats
        return len(self.stats)


# ----------------------------------------------------------------------------------------- one shard


class _OpenShard:
    """An output shard being written to NAME.tar.tmp, with its counts."""

    def __init__(self, out: str, name: str):
        import webdataset as wds

        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)  # stale: no counts, other settings, or --overwrite
        self.sink = wds.TarWriter(path + ".tmp", encoder=False, mtime=0)
        self.samples, self.tokens, self.t0 = 0, 0, time.time()

    def write(self, batch: dict, tensors: list[dict]) -> None:
        import safetensors.torch

        for key, caption, js, t in zip(batch["keys"], batch["captions"], batch["jsons"], tensors):
            rec = {"__key__": key, "safetensors": safetensors.torch.save(t), "txt": caption.encode()}
            if js is not None:
                rec["json"] = js
            self.sink.write(rec)
            self.tokens += len(t.get("text_emb", t.get("text_ids")))
        self.samples += len(tensors)

    def close(self, url: str, bad: dict) -> dict:
        self.sink.close()
        return dict(input=url, samples=self.samples, bad=bad, text_tokens=self.tokens,
                    seconds=round(time.time() - self.t0, 3))


def _publish(out: str, name: str, stats: dict) -> None:
    """Counts first, then the shard: a shard under its final name always has its counts."""
    _write_json(os.path.join(out, STATE_DIR, f"{name}.json"), stats)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


# ----------------------------------------------------------------------------------------- the job


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device(local_rank: int, device: str = "") -> str:
    """cuda:LOCAL_RANK when a GPU is there (or `device` is "cuda"), else `device` or cpu."""
    if device in ("", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device or "cpu"


def precompute(cfg: DataConfig, inputs: list[str], out: str, storage: str = "emb", latent_dtype: str = "fp32",
               device: str = "", overwrite: bool = False, progress: bool = True, spec: str | None = None,
               workers: int = 0, poll_s: float = 1.0) -> dict | None:
    """Encode this rank's share of `inputs` into `out`; rank 0 then waits for all shards and writes
    manifest.json, whose contents it returns (other ranks: None). `spec` is the --input value (for the
    output pattern); `workers` DataLoader workers per rank decode (one shard each at a time); rank and world
    size come from RANK / WORLD_SIZE."""
    from tqdm import tqdm

    rank, world, local_rank = _dist_env()
    names = output_names(inputs)
    settings = _settings(cfg, storage, latent_dtype)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    _check_settings(out, settings, overwrite)
    finished = Finished(out, names, settings)
    finished.poll()
    done_at_start = set() if overwrite else set(finished.stats)
    todo = [(u, n) for i, (u, n) in enumerate(zip(inputs, names)) if i % world == rank and n not in done_at_start]
    bar = tqdm(total=len(names), initial=len(done_at_start), unit="shard", desc=f"precompute ({world} proc)",
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    if todo:
        _encode(todo, cfg, out, storage, latent_dtype, default_device(local_rank, device), workers,
                dict(settings=settings, rank=rank, world_size=world), lambda: bar.update(finished.poll() - bar.n))
    if rank != 0:
        return None
    while finished.poll() < len(names):  # the other ranks' shards
        bar.update(len(finished.stats) - bar.n)
        time.sleep(poll_s)
    bar.update(len(finished.stats) - bar.n)
    bar.close()
    manifest = _merge(cfg, finished, storage, latent_dtype, output_pattern(spec or inputs, out, names))
    new = [finished.stats[n] for n in names if n not in done_at_start]
    secs = time.time() - t0
    new_samples = sum(s["samples"] for s in new)
    manifest["last_run"] = dict(world_size=world, new_shards=len(new), new_samples=new_samples, seconds=round(secs, 2),
                                samples_per_s=round(new_samples / secs, 1) if new_samples else None)
    write_manifest(out, manifest)
    return manifest


def _encode(todo: list[tuple[str, str]], cfg: DataConfig, out: str, storage: str, latent_dtype: str, device: str,
            workers: int, tags: dict, on_shard) -> None:
    """Encode the shards `todo` [(url, name)] on `device`, decoded by `workers` DataLoader workers; each
    output is published when complete."""
    text, vae = load_text_encoder(cfg, device), load_vae(cfg, device)
    urls = dict((n, u) for u, n in todo)
    loader = torch.utils.data.DataLoader(ShardBatches(todo, cfg), batch_size=None, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    open_shards, good, bad = {}, 0, Counter()
    for item in loader:
        name = item["name"]
        if name not in open_shards:
            open_shards[name] = _OpenShard(out, name)
        if not item.get("end"):
            open_shards[name].write(item, encode_batch(item["images"], item["captions"], text, vae, storage,
                                           LATENT_DTYPES[latent_dtype]))
            continue
        stats = open_shards.pop(name).close(urls[name], item["bad"])
        good += stats["samples"]
        bad.update(stats["bad"])
        check_bad_fraction(good, bad, cfg, f" (rank {tags['rank']}, {urls[name]})")
        _publish(out, name, dict(stats, **tags))
        on_shard()


def _merge(cfg: DataConfig, finished: Finished, storage: str, latent_dtype: str, pattern: str) -> dict:
    """manifest.json from the counts of every shard."""
    stats = [finished.stats[n] for n in finished.names]
    shapes = data_shapes(cfg)
    samples = sum(s["samples"] for s in stats)
    bad = Counter()
    for s in stats:
        bad.update(s["bad"])
    tokens = sum(s["text_tokens"] for s in stats)
    disk = sum(os.path.getsize(os.path.join(finished.out, n)) for n in finished.names)
    latent_bytes = shapes.latent_channels * shapes.latent_size ** 2 * LATENT_DTYPES[latent_dtype].itemsize
    dim = text_dim(cfg)
    mean_len = tokens / samples if samples else None
    m = dict(format=1, settings=finished.settings, shards=len(stats), pattern=pattern, samples=samples,
             bad=dict(sorted(bad.items())),
             latent_shape=[shapes.latent_channels, shapes.latent_size, shapes.latent_size],
             latent_dtype=latent_dtype, text_storage=storage, text_encoder=cfg.text_encoder,
             text_encoder_path=finished.settings["text_encoder_path"], text_dim=dim, max_text_len=cfg.max_text_len,
             vae=cfg.vae, vae_path=finished.settings["vae_path"], image_size=cfg.image_size,
             mean_text_tokens=mean_len, latent_bytes=latent_bytes,
             bytes_per_sample=round(disk / samples) if samples else None)
    if mean_len is not None:
        m["bytes_per_sample_emb"] = round(latent_bytes + mean_len * dim * 2)
        m["bytes_per_sample_ids"] = round(latent_bytes + mean_len * 4)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.precompute",
        description="Encode image-caption WebDataset shards (jpg/png + txt) into latent shards (latent + bf16 text "
        "embeddings, or latent + token ids) with the frozen VAE and text encoder. Resumable per shard; under "
        "torchrun (or with RANK/WORLD_SIZE set) the shards are split over the processes, one device each.",
        epilog="Storage trade-off: 'emb' stores bf16 text embeddings (no text encoder in training; T5 embeddings are "
        "~30-100x the size of the latents), 'ids' stores token ids (tiny; the text encoder runs online). "
        "The bytes per sample of both are printed at the end. Example: torchrun --nproc_per_node=8 -m "
        "data.precompute --input 'shards/{000000..099999}.tar' --output latents/ --text-storage ids")
    p.add_argument("--input", required=True, help="input shards: brace pattern, paths or pipe: URLs ('::' joins)")
    p.add_argument("--output", required=True, help="output directory (one NAME.tar per input NAME.tar + manifest.json)")
    p.add_argument("--text-storage", choices=("emb", "ids"), default="emb", help="store text embeddings or token ids")
    p.add_argument("--text-encoder", choices=("minilm", "t5"), default="minilm")
    p.add_argument("--text-encoder-path", default="", help="T5 name/dir ('' = the embedded MiniLM)")
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--vae", choices=("pixel", "kl"), default="pixel")
    p.add_argument("--vae-path", default="", help="AutoencoderKL dir/name (--vae kl)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers per process that read and decode input shards (0: in the main process)")
    p.add_argument("--device", default="", help="default: cuda:LOCAL_RANK when there is a GPU, else cpu")
    p.add_argument("--encoder-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on a bf16-capable GPU (a VAE with force_upcast stays fp32)")
    p.add_argument("--max-bad-fraction", type=float, default=DataConfig.max_bad_fraction,
                   help="stop when more of a process's samples than this are bad (judged after "
                   f"{DataConfig.min_samples_for_bad_check} samples)")
    p.add_argument("--overwrite", action="store_true", help="re-encode shards that already exist")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = DataConfig(shards=a.input, text_encoder=a.text_encoder, text_encoder_path=a.text_encoder_path,
                         max_text_len=a.max_text_len, vae=a.vae, vae_path=a.vae_path, image_size=a.image_size,
                         batch_size=a.batch_size, encoder_dtype=a.encoder_dtype, max_bad_fraction=a.max_bad_fraction)
        inputs = expand_shards(a.input)
        missing = [u for u in inputs if not u.startswith(("pipe:", "http:", "https:")) and not os.path.isfile(u)]
        if missing:
            raise ValueError(f"--input: {len(missing)} shard(s) do not exist, first {missing[0]}")
        s = precompute(cfg, inputs, a.output, a.text_storage, a.latent_dtype, a.device, a.overwrite,
                       not a.no_progress, spec=a.input, workers=a.workers)
    except (ValueError, OSError, RuntimeError) as e:
        p.exit(2, f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    if s is not None:
        _print_summary(s, a.output)
    return 0


def _print_summary(s: dict, out: str) -> None:
    run = s["last_run"]
    print(f"wrote {s['shards']} shards, {s['samples']} samples ({run['new_samples']} new in this run, "
          f"{run['world_size']} process(es), {run['samples_per_s']} samples/s): {os.path.join(out, 'manifest.json')}")
    print(f"train on them: data=latent_shards data.shards='{s['pattern']}'")
    if s["mean_text_tokens"] is not None:
        print(f"bytes/sample: latent {s['latent_bytes']} + text: emb {s['bytes_per_sample_emb'] - s['latent_bytes']} "
              f"(= {s['bytes_per_sample_emb']}) vs ids {s['bytes_per_sample_ids'] - s['latent_bytes']} "
              f"(= {s['bytes_per_sample_ids']}); at 1.2B samples: {s['bytes_per_sample_emb'] * 1.2e9 / 1e12:.1f} TB (emb) vs "
              f"{s['bytes_per_sample_ids'] * 1.2e9 / 1e12:.1f} TB (ids); on disk {s['bytes_per_sample']} bytes/sample")
    if s["bad"]:
        print(f"skipped bad samples: {s['bad']}")


if __name__ == "__main__":
    sys.exit(main())
