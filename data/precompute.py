"""Image shards -> latent shards with the frozen encoders (CLI: python -m data.precompute --help).

Each output sample: `safetensors` = {"latent": [C, S, S] (fp32 or bf16), and either "text_emb": bf16 [L_i, Dt]
truncated to the caption's L_i tokens (--text-storage emb) or "text_ids": int32 [L_i] (--text-storage ids)},
plus the caption (txt) and the input's json. Output shard k holds the samples of input shard k; it is
written under a temporary name and renamed when complete, so a rerun skips finished shards (resumable per
shard). A manifest.json records the settings, counts and bytes per sample.

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
import sys
import time
from collections import Counter

import numpy as np

import torch

from data.config import DataConfig, data_shapes
from data.encoders import load_text_encoder, load_vae
from data.shards import BadSample, check_bad_fraction, decode_image_sample, expand_shards

LATENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _read_shard(url: str, cfg: DataConfig, bad: dict):
    """Decoded image samples of one shard in file order; bad ones counted in `bad` and skipped."""
    import webdataset as wds

    def on_error(exn):
        bad["tar"] = bad.get("tar", 0) + 1
        print(f"warning: {url}: {type(exn).__name__}: {exn}", file=sys.stderr)
        return True

    for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=on_error)):
        try:
            yield decode_image_sample(raw, cfg), raw.get("json")
        except BadSample as e:
            bad[e.reason] = bad.get(e.reason, 0) + 1


def encode_batch(samples: list[dict], text, vae, storage: str, latent_dtype: torch.dtype) -> list[dict]:
    """Decoded samples -> per-sample tensors to store: latent [C,S,S] and text_emb [L_i,Dt] / text_ids [L_i]."""
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).float() / 127.5 - 1.0
    latents = vae.encode(images).to("cpu", latent_dtype)  # [B, C, S, S]
    ids, mask = text.tokenize([s["caption"] for s in samples])  # [B, L]
    lengths = mask.sum(1).tolist()
    if storage == "emb":
        emb = text.encode(ids, mask).to("cpu", torch.bfloat16)  # [B, L, Dt]
        texts = [dict(text_emb=emb[i, :n].contiguous()) for i, n in enumerate(lengths)]
    else:
        texts = [dict(text_ids=ids[i, :n].to(torch.int32).contiguous()) for i, n in enumerate(lengths)]
    return [dict(latent=latents[i].contiguous(), **t) for i, t in enumerate(texts)]


def precompute(cfg: DataConfig, inputs: list[str], out: str, storage: str = "emb", latent_dtype: str = "fp32",
               device="cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Encode every input shard into out/latent-NNNNNN.tar; returns the summary written to manifest.json."""
    import safetensors.torch
    import webdataset as wds
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    settings = dict(text_encoder=cfg.text_encoder, text_encoder_path=cfg.text_encoder_path, vae=cfg.vae,
                    vae_path=cfg.vae_path, image_size=cfg.image_size, max_text_len=cfg.max_text_len,
                    text_storage=storage, latent_dtype=latent_dtype)
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.exists(manifest_path) and not overwrite:
        with open(manifest_path) as f:
            old = json.load(f).get("settings")
        if old != settings:
            raise ValueError(f"--output {out} holds shards made with other settings {old}; use --overwrite or another dir")
    text, vae = load_text_encoder(cfg, device), load_vae(cfg, device)
    shapes = data_shapes(cfg)
    bad, n_samples, n_new, text_tokens, t0 = {}, 0, 0, 0, time.time()
    names = []
    bar = tqdm(inputs, unit="shard", desc="precompute", disable=not progress, file=sys.stderr)
    for k, url in enumerate(bar):
        path = os.path.join(out, f"latent-{k:06d}.tar")
        names.append(path)
        if os.path.exists(path) and not overwrite:
            continue  # resumable per shard: finished shards are complete (atomic rename)
        with wds.TarWriter(path + ".tmp", encoder=False, mtime=0) as sink:
            pending = []

            def flush():
                nonlocal n_samples, n_new, text_tokens
                for (s, js), t in zip(pending, encode_batch([p[0] for p in pending], text, vae, storage, LATENT_DTYPES[latent_dtype])):
                    rec = {"__key__": s["key"], "safetensors": safetensors.torch.save(t), "txt": s["caption"].encode()}
                    if js is not None:
                        rec["json"] = js
                    sink.write(rec)
                    text_tokens += len(t.get("text_emb", t.get("text_ids")))
                n_samples += len(pending)
                n_new += len(pending)
                pending.clear()

            for item in _read_shard(url, cfg, bad):
                pending.append(item)
                if len(pending) == cfg.batch_size:
                    flush()
                    bar.set_postfix(samples=n_samples, per_s=f"{n_new / (time.time() - t0):.0f}")
            if pending:
                flush()
        check_bad_fraction(n_samples, Counter(bad), cfg, f" ({url})")
        os.replace(path + ".tmp", path)
    bar.close()
    secs = time.time() - t0
    latent_bytes = shapes.latent_channels * shapes.latent_size ** 2 * LATENT_DTYPES[latent_dtype].itemsize
    mean_len = text_tokens / max(1, n_new) if n_new else None
    summary = dict(settings=settings, shards=len(names), pattern=os.path.join(out, f"latent-{{000000..{len(names) - 1:06d}}}.tar"),
                   new_samples=n_new, seconds=round(secs, 2), samples_per_s=round(n_new / secs, 1) if n_new else None,
                   bad=bad, latent_shape=[shapes.latent_channels, shapes.latent_size, shapes.latent_size],
                   text_dim=text.dim, mean_text_tokens=mean_len, latent_bytes=latent_bytes)
    if mean_len is not None:
        summary["bytes_per_sample_emb"] = round(latent_bytes + mean_len * text.dim * 2)
        summary["bytes_per_sample_ids"] = round(latent_bytes + mean_len * 4)
    with open(manifest_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.precompute",
        description="Encode image-caption WebDataset shards (jpg/png + txt) into latent shards (latent + bf16 text "
        "embeddings, or latent + token ids) with the frozen VAE and text encoder. Resumable per shard.",
        epilog="Storage trade-off: 'emb' stores bf16 text embeddings (no text encoder in training; T5 embeddings are "
        "~30-100x the size of the latents), 'ids' stores token ids (tiny; the text encoder runs online). "
        "The bytes per sample of both are printed at the end.")
    p.add_argument("--input", required=True, help="input shards: brace pattern, paths or pipe: URLs ('::' joins)")
    p.add_argument("--output", required=True, help="output directory (latent-NNNNNN.tar + manifest.json)")
    p.add_argument("--text-storage", choices=("emb", "ids"), default="emb", help="store text embeddings or token ids")
    p.add_argument("--text-encoder", choices=("minilm", "t5"), default="minilm")
    p.add_argument("--text-encoder-path", default="", help="T5 name/dir ('' = the embedded MiniLM)")
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--vae", choices=("pixel", "kl"), default="pixel")
    p.add_argument("--vae-path", default="", help="AutoencoderKL dir/name (--vae kl)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true", help="re-encode shards that already exist")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = DataConfig(shards=a.input, text_encoder=a.text_encoder, text_encoder_path=a.text_encoder_path,
                         max_text_len=a.max_text_len, vae=a.vae, vae_path=a.vae_path, image_size=a.image_size,
                         batch_size=a.batch_size, max_bad_fraction=a.max_bad_fraction, min_samples_for_bad_check=0)
        inputs = expand_shards(a.input)
        missing = [u for u in inputs if not u.startswith(("pipe:", "http:", "https:")) and not os.path.isfile(u)]
        if missing:
            raise ValueError(f"--input: {len(missing)} shard(s) do not exist, first {missing[0]}")
        s = precompute(cfg, inputs, a.output, a.text_storage, a.latent_dtype, a.device, a.overwrite, not a.no_progress)
    except (ValueError, OSError, RuntimeError) as e:
        p.exit(2, f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    print(f"wrote {s['shards']} shards ({s['new_samples']} new samples, {s['samples_per_s']} samples/s): {s['pattern']}")
    if s["mean_text_tokens"] is not None:
        print(f"bytes/sample: latent {s['latent_bytes']} + text: emb {s['bytes_per_sample_emb'] - s['latent_bytes']} "
              f"(= {s['bytes_per_sample_emb']}) vs ids {s['bytes_per_sample_ids'] - s['latent_bytes']} "
              f"(= {s['bytes_per_sample_ids']}); at 1.2B samples: {s['bytes_per_sample_emb'] * 1.2e9 / 1e12:.1f} TB (emb) vs "
              f"{s['bytes_per_sample_ids'] * 1.2e9 / 1e12:.1f} TB (ids)")
    if s["bad"]:
        print(f"skipped bad samples: {s['bad']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
