"""Data at the brief's scale: web JPEG decode rate per worker, and the cost of resuming mid-epoch.

    python bench/data_scale.py [--jpeg-samples 512] [--resume-shards 1000] [--out data_scale.json]

1. img2dataset-layout shards of 320-px JPEGs (data/webshards.py: ~20-30 KB each, as crawled images) read
   through the image loader at image_size 256: decode + resize/crop + tokenize, samples/s with 1 and 2
   DataLoader workers, and per worker. Next to it, the workers per GPU that feed EC-DiT-XL-8E training at
   45% MFU on an H100 (bf16 dense peak 989 TFLOP/s), from model/flops.py's FLOPs per image.
2. Resume: an epoch of --resume-shards small shards (10 samples each); the stream is stopped at 10%, 50%
   and 90% of the epoch, its state saved, and a fresh loader restored from it. Reported: time from
   restore() to the first batch (the same ranks, and elastically at 2 ranks; fastest of --repeats,
   interleaved), and the bytes of the tar samples read before that first batch. The target: 90% / 10% <= 1.2 (the cost does not grow with the position).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, parser, write_json  # noqa: E402

H100_BF16_PEAK = 989e12
MFU = 0.45


def _rate(loader, limit: int) -> float:
    t0, n = time.perf_counter(), 0
    for batch in itertools.islice(loader, limit):
        n += len(batch["key"])
    return n / (time.perf_counter() - t0)


def jpeg_rates(tmp: str, samples: int, workers: list[int]) -> dict:
    from data.config import DataConfig
    from data.shards import make_image_loader
    from data.webshards import write_web_shards

    per_shard = max(1, samples // 8)
    pattern, _ = write_web_shards(f"{tmp}/web", 8, per_shard, size=320, seed=0)
    size = sum(p.stat().st_size for p in Path(f"{tmp}/web").glob("*.tar")) / (8 * per_shard)
    out = {"jpeg_bytes_per_sample": round(size)}
    for w in workers:
        cfg = DataConfig(shards=pattern, batch_size=32, num_workers=w, image_size=256, epochs=1, shuffle_buffer=64)
        rate = max(_rate(make_image_loader(cfg), 10**9) for _ in range(2))
        out[f"jpeg_w{w}_samples_per_s"] = round(rate, 1)
        out[f"jpeg_w{w}_per_worker_samples_per_s"] = round(rate / max(1, w), 1)
    return out


def feed_arithmetic(per_worker: float) -> dict:
    """Images/s that EC-DiT-XL-8E trains at 45% MFU on an H100, and the workers that decode that many."""
    from model.config import get_preset
    from model.flops import train_step_flops

    mcfg = get_preset("ec-xl-8e")
    per_image = train_step_flops(mcfg, 1, text_len=120)
    images = MFU * H100_BF16_PEAK / per_image
    return {"xl8e_train_flops_per_image": per_image, "xl8e_images_per_s_per_gpu": round(images, 1),
            "workers_per_gpu": math.ceil(images / per_worker)}


def _counting_bytes(monkey: dict):
    """Wrap data.shards.shard_samples so that the bytes of every tar sample read are added up."""
    import data.shards as shards

    real = shards.shard_samples

    def counted(url, *args):
        for raw in real(url, *args):
            monkey["bytes"] += sum(len(v) for k, v in raw.items() if isinstance(v, bytes))
            yield raw

    shards.shard_samples = counted
    return lambda: setattr(shards, "shard_samples", real)


def resume_costs(tmp: str, n_shards: int, repeats: int) -> dict:
    from data.config import DataConfig
    from data.shards import make_image_loader
    from data.synthetic import write_shards

    pattern = write_shards(f"{tmp}/small", n_shards * 10, 10, 32, seed=0, progress=False)
    cfg = DataConfig(shards=pattern, batch_size=10, num_workers=0, epochs=1, shuffle_buffer=100)
    states = {}
    for pct in (10, 50, 90):  # one epoch is n_shards batches
        first = make_image_loader(cfg)
        for _ in itertools.islice(first, n_shards * pct // 100):
            pass
        states[pct] = json.loads(json.dumps(first.state_dict()))
    times: dict[str, list[float]] = {}
    out = {}
    for _ in range(repeats):  # round-robin over the positions, so the machine's load drifts alike
        for pct in (10, 50, 90):
            for mode, world in (("exact", 1), ("elastic", 2)):
                loader = make_image_loader(cfg, rank=0, world_size=world)
                counter = {"bytes": 0}
                restore = _counting_bytes(counter)
                try:
                    t0 = time.perf_counter()
                    loader.restore([states[pct]])
                    next(iter(loader))
                    times.setdefault(f"{mode}_{pct}", []).append(1000 * (time.perf_counter() - t0))
                finally:
                    restore()
                out[f"resume_{mode}_{pct}pct_bytes_read"] = counter["bytes"]
    for key, values in times.items():
        mode, pct = key.split("_")
        out[f"resume_{mode}_{pct}pct_first_batch_ms"] = round(min(values), 1)
    for mode in ("exact", "elastic"):
        out[f"resume_{mode}_90_vs_10_ratio"] = round(out[f"resume_{mode}_90pct_first_batch_ms"]
                                                     / out[f"resume_{mode}_10pct_first_batch_ms"], 3)
    return out


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], "ec-xl-8e")
    p.add_argument("--jpeg-samples", type=int, default=512)
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts (JPEG rates)")
    p.add_argument("--resume-shards", type=int, default=1000, help="small shards (10 samples) in the resume epoch")
    p.add_argument("--repeats", type=int, default=5, help="restores per position (the fastest is reported)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    figures = environment(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(jpeg_rates(tmp, args.jpeg_samples, workers))
        figures.update(resume_costs(tmp, args.resume_shards, args.repeats))
    per_worker = figures[f"jpeg_w{workers[0]}_per_worker_samples_per_s"]
    figures.update(feed_arithmetic(per_worker))

    print(f"web JPEGs (320 px, {figures['jpeg_bytes_per_sample']} B/sample) -> 256 px + tokens:")
    for w in workers:
        print(f"  {w} worker(s): {figures[f'jpeg_w{w}_samples_per_s']:8.1f} samples/s "
              f"({figures[f'jpeg_w{w}_per_worker_samples_per_s']:.1f} per worker)")
    print(f"EC-DiT-XL-8E at {MFU:.0%} MFU on an H100: {H100_BF16_PEAK / 1e12:.0f} TFLOP/s x {MFU} / "
          f"{figures['xl8e_train_flops_per_image'] / 1e12:.3f} TFLOP per image (fwd+bwd, 128 kept tokens, text 120) "
          f"= {figures['xl8e_images_per_s_per_gpu']} images/s per GPU -> {figures['workers_per_gpu']} workers "
          f"per GPU at {per_worker:.1f} samples/s per worker")
    print(f"\nresume ({args.resume_shards} shards x 10 samples): time to the first batch, bytes read")
    print(f"{'position':<10}{'exact ms':>10}{'exact bytes':>14}{'elastic ms':>12}{'elastic bytes':>15}")
    for pct in (10, 50, 90):
        print(f"{pct:>3}%      {figures[f'resume_exact_{pct}pct_first_batch_ms']:>10}"
              f"{figures[f'resume_exact_{pct}pct_bytes_read']:>14}{figures[f'resume_elastic_{pct}pct_first_batch_ms']:>12}"
              f"{figures[f'resume_elastic_{pct}pct_bytes_read']:>15}")
    print(f"90% / 10%: exact {figures['resume_exact_90_vs_10_ratio']}, elastic "
          f"{figures['resume_elastic_90_vs_10_ratio']} (target <= 1.2)")
    write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
