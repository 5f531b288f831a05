"""Training-step time (forward + backward) of an EC-MoE model vs its dense twins and token choice.

    python bench/step.py [--preset small-ec] [--batch 16] [--iters 10] [--device cpu] [--dtype fp32|bf16]

Models, all on the same backbone and the same masked batch, measured round-robin in one run:
  dense     the dense twin (one 4d FFN per block)
  dense-eq  dense twin whose FFNs at the MoE positions are f_c times wider: equal activated compute
  ec        expert choice, f_c = 2 (the paper)
  tc        token choice top-2, capacity factor 1 (same expert FLOPs as ec)
The target is ec / dense-eq <= 1.10 (routing overhead at equal activated compute).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import environment, parser, round_robin, write_json  # noqa: E402
from model.config import dense_twin, get_preset  # noqa: E402
from model.dit import build_model  # noqa: E402
from model.flow import FlowConfig, flow_loss  # noqa: E402
from model.params import param_counts  # noqa: E402


def variants(preset: str) -> dict:
    ec = get_preset(preset, moe=dict(router="expert_choice", capacity_factor=2.0))
    tc = get_preset(preset, moe=dict(router="token_choice", top_k=2, tc_capacity_factor=1.0))
    tc.name, ec.name = f"{preset}-tc", f"{preset}-ec"
    return {"dense": dense_twin(ec), "dense-eq": dense_twin(ec, equal_compute=True), "ec": ec, "tc": tc}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], "small-ec")
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (GPU)")
    p.add_argument("--no-mask", action="store_true", help="run on all tokens (no MaskDiT dropping)")
    args = p.parse_args(argv)
    dev = args.device
    cfgs = variants(args.preset)
    models = {k: build_model(c, device=dev, seed=0) for k, c in cfgs.items()}
    cfg = cfgs["ec"]
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x0 = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g).to(dev)
    fcfg = FlowConfig()
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(name: str) -> float:
        m = models[name]
        sync(dev)
        t0 = time.perf_counter()
        with autocast:
            out = flow_loss(m, x0, ctx, None, fcfg, mask_tokens=not args.no_mask,
                            generator=torch.Generator(device=dev).manual_seed(0), collect_stats=False)
        out["loss"].backward()
        sync(dev)
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = round_robin(step, models, args.warmup, args.iters)
    tokens = B * (cfg.num_tokens if args.no_mask else cfg.kept_tokens)
    fig = environment(dev)
    fig.update(preset=args.preset, batch=B, tokens_per_step=tokens, dtype=args.dtype, iters=args.iters)
    print(f"preset {args.preset}: batch {B}, {tokens} tokens/step, {args.dtype}, {dev}, "
          f"{torch.get_num_threads()} threads, median of {args.iters}")
    hdr = f"{'model':<9} {'total params':>13} {'activated':>11} {'step ms':>9} {'tokens/s':>10} {'vs dense-eq':>12}"
    print(hdr)
    print("-" * len(hdr))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, c in cfgs.items():
        pc = param_counts(c)
        ratio = med[name] / med["dense-eq"]
        print(f"{name:<9} {pc.total / 1e6:>12.2f}M {pc.activated / 1e6:>10.2f}M {med[name]:>9.1f} "
              f"{tokens / med[name] * 1e3:>10.0f} {ratio:>11.3f}x")
        key = name.replace("-", "_")
        fig[f"{key}_step_ms"] = round(med[name], 3)
        fig[f"{key}_tokens_per_s"] = round(tokens / med[name] * 1e3, 1)
    fig["ec_vs_dense_eq_ratio"] = round(med["ec"] / med["dense-eq"], 4)
    fig["tc_vs_dense_eq_ratio"] = round(med["tc"] / med["dense-eq"], 4)
    fig["ec_vs_dense_ratio"] = round(med["ec"] / med["dense"], 4)
    fig["tc_vs_ec_ratio"] = round(med["tc"] / med["ec"], 4)
    print(f"\nEC / dense at equal activated compute: {fig['ec_vs_dense_eq_ratio']:.3f}x (target <= 1.10); "
          f"TC / dense-eq: {fig['tc_vs_dense_eq_ratio']:.3f}x; EC / plain dense twin: {fig['ec_vs_dense_ratio']:.3f}x")
    write_json(args.out, fig)
    return fig


if __name__ == "__main__":
    main()
