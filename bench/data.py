"""Data pipeline throughput (samples/s) with 0, 1, 2 DataLoader workers, side by side.

    python bench/data.py [--num-samples 1024] [--workers 0,1,2] [--out data.json]

Pipelines, each read for one full epoch of the embedded shapes set (32x32, written to a temp dir first):
  raw            image shards -> decoded images + token ids (no encoders)
  raw_encoded    the same + frozen encoders in the main process (pixel VAE, MiniLM text embeddings), run with
                 max(1, threads - workers) torch threads so the encoder and the workers share the cores
  latent_emb     precomputed latent shards with stored bf16 text embeddings
  latent_ids     precomputed latent shards with token ids (text encoder left to the training step)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, parser, write_json  # noqa: E402


def _rate(loader) -> float:
    """Samples per second over one epoch, DataLoader worker start-up included."""
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["key"])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], "shapes32")
    p.add_argument("--num-samples", type=int, default=1024, help="samples in the temporary shapes set")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--repeats", type=int, default=2, help="epochs per cell; the best rate is reported")
    args = p.parse_args(argv)
    if args.preset != "shapes32":
        p.exit(2, f"error: --preset {args.preset}: only 'shapes32' (the embedded 32x32 shapes set) exists\n")
    workers = [int(w) for w in args.workers.split(",")]

    from data.config import DataConfig
    from data.encoders import FrozenEncoders
    from data.precompute import precompute
    from data.shardlist import expand_shards
    from data.shards import make_image_loader, make_latent_loader
    from data.synthetic import write_shards

    import torch

    threads = torch.get_num_threads()
    figures = environment(args.device)
    figures.update(num_samples=args.num_samples, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_shards(f"{tmp}/raw", args.num_samples, args.shard_size, 32, seed=0, progress=False)
        base = DataConfig(shards=raw, batch_size=args.batch_size, epochs=1, shuffle_buffer=256, drop_last=False)
        t0 = time.perf_counter()
        emb = precompute(base, expand_shards(raw), f"{tmp}/emb", "emb", device=args.device, progress=False)
        figures["precompute_emb_samples_per_s"] = round(args.num_samples / (time.perf_counter() - t0), 1)
        ids = precompute(base, expand_shards(raw), f"{tmp}/ids", "ids", device=args.device, progress=False)
        figures.update(bytes_per_sample_emb=emb["bytes_per_sample_emb"], bytes_per_sample_ids=emb["bytes_per_sample_ids"])
        encoders = FrozenEncoders(base, args.device)
        encoders.text(["warm-up"] * args.batch_size)  # first call pays one-off kernel set-up
        rows = {
            "raw": lambda c: make_image_loader(c),
            "raw_encoded": lambda c: make_image_loader(c, transform=encoders),
            "latent_emb": lambda c: make_latent_loader(c.replace(shards=emb["pattern"])),
            "latent_ids": lambda c: make_latent_loader(c.replace(shards=ids["pattern"])),
        }
        print(f"{'pipeline (samples/s)':<22}" + "".join(f"{f'{w} workers':>12}" for w in workers))
        print("-" * (22 + 12 * len(workers)))
        for name, make in rows.items():
            cells = []
            for w in workers:
                # main-process torch threads + busy workers must not oversubscribe the cores (OpenMP spin-waits)
                torch.set_num_threads(max(1, threads - w) if name == "raw_encoded" else threads)
                rate = max(_rate(make(base.replace(num_workers=w))) for _ in range(args.repeats))  # best of: shared CPUs
                figures[f"{name}_w{w}_samples_per_s"] = round(rate, 1)
                cells.append(f"{rate:>12.0f}")
            print(f"{name:<22}" + "".join(cells))
        torch.set_num_threads(threads)
    print(f"\nprecompute (MiniLM emb, {args.device}): {figures['precompute_emb_samples_per_s']} samples/s; bytes/sample "
          f"emb {figures['bytes_per_sample_emb']} vs ids {figures['bytes_per_sample_ids']}; "
          f"{figures['threads']} torch threads on {figures['host_cpus']} CPUs")
    write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
