"""Training-step time (forward + backward) of an EC-MoE model vs its dense twins and token choice.

    python bench/step.py [--preset small-ec] [--batch 16] [--iters 10] [--device cpu] [--dtype fp32|bf16]
    python bench/step.py --compile --grouped-mm      # + compiled rows and grouped-GEMM expert rows

Models, all on the same backbone and the same masked batch, measured round-robin in one run:
  dense     the dense twin (one 4d FFN per block)
  dense-eq  dense twin whose FFNs at the MoE positions are f_c times wider: equal activated compute
  ec        expert choice, f_c = 2 (the paper)
  tc        token choice top-2, capacity factor 1 (same expert FLOPs as ec)
`--compile` adds a "+compile" row per model (each block torch.compiled, parallel/compile.py; the same
weights, the eager rows run with the compiled code switched off); `--grouped-mm` adds "+gmm" rows of
the MoE models with their experts through torch._grouped_mm instead of bmm. MFU (forward + backward
FLOPs of model/flops.py over the device's bf16 peak) is shown where the peak is known (GPU name or
--peak-tflops). The target is ec / dense-eq <= 1.10 (routing overhead at equal activated compute).
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import environment, parser, round_robin, write_json  # noqa: E402
from model.config import dense_twin, get_preset  # noqa: E402
from model.dit import build_model  # noqa: E402
from model.flops import mfu, train_step_flops  # noqa: E402
from model.flow import FlowConfig, flow_loss  # noqa: E402
from model.moe import GroupedExperts  # noqa: E402
from model.params import param_counts  # noqa: E402
from parallel.compile import compile_blocks  # noqa: E402
from parallel.fsdp import apply_activation_checkpointing  # noqa: E402
from train.metrics import device_peak_flops  # noqa: E402

MODELS = ("dense", "dense-eq", "ec", "tc")


def variants(preset: str, names=MODELS) -> dict:
    ec = get_preset(preset, moe=dict(router="expert_choice", capacity_factor=2.0))
    tc = get_preset(preset, moe=dict(router="token_choice", top_k=2, tc_capacity_factor=1.0))
    tc.name, ec.name = f"{preset}-tc", f"{preset}-ec"
    cfgs = {"dense": dense_twin(ec), "dense-eq": dense_twin(ec, equal_compute=True), "ec": ec, "tc": tc}
    return {k: cfgs[k] for k in names}


def rows(names, compiled: bool, grouped_mm: bool, bf16: bool) -> dict[str, tuple[str, bool, str]]:
    """Row name -> (model, compiled, expert matmul). Compiled grouped-GEMM rows only in bf16 (a compiled
    fp32 forward runs the experts through bmm, see model/moe.py)."""
    out = {n: (n, False, "bmm") for n in names}
    if grouped_mm:
        out.update({f"{n}+gmm": (n, False, "grouped_mm") for n in names if n in ("ec", "tc")})
    if compiled:
        out.update({f"{r}+compile": (n, True, mm) for r, (n, _, mm) in list(out.items())
                    if bf16 or mm == "bmm"})
    return out


def set_expert_matmul(model: torch.nn.Module, matmul: str) -> None:
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.matmul = matmul


@contextmanager
def compiled_code(enabled: bool):
    """Run compiled blocks as compiled, or (enabled=False) as eager code."""
    if enabled:
        yield
    else:
        with torch.compiler.set_stance("force_eager"):
            yield


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
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to time")
    p.add_argument("--compile", action="store_true", help="also time every model with its blocks compiled")
    p.add_argument("--grouped-mm", action="store_true", help="also time the MoE models with torch._grouped_mm experts")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--profile", default=None, metavar="ROW", help="after timing, profile one step of this row "
                   "(e.g. ec+compile) and print its top kernels")
    args = p.parse_args(argv)
    dev = args.device
    if "dense-eq" not in args.models:
        p.error("--models must include dense-eq (the reference of the ratios)")
    cfgs = variants(args.preset, args.models)
    models = {k: build_model(c, device=dev, seed=0) for k, c in cfgs.items()}
    for m in models.values():
        if args.activation_checkpointing:
            apply_activation_checkpointing(m)
        if args.compile:
            compile_blocks(m)
    table = rows(args.models, args.compile, args.grouped_mm, args.dtype == "bf16")
    cfg = next(iter(cfgs.values()))
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x0 = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g).to(dev)
    fcfg = FlowConfig()
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(row: str) -> float:
        name, compiled, matmul = table[row]
        m = models[name]
        set_expert_matmul(m, matmul)
        sync(dev)
        t0 = time.perf_counter()
        with autocast, compiled_code(compiled):
            out = flow_loss(m, x0, ctx, None, fcfg, mask_tokens=not args.no_mask,
                            generator=torch.Generator(device=dev).manual_seed(0), collect_stats=False)
            out["loss"].backward()
        sync(dev)
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    if args.profile is not None and args.profile not in table:
        p.error(f"--profile {args.profile!r} is not a row of this run: {', '.join(table)}")
    times = round_robin(step, table, args.warmup, args.iters)
    tokens = B * (cfg.num_tokens if args.no_mask else cfg.kept_tokens)
    peak = device_peak_flops(torch.device(dev), args.peak_tflops)
    fig = environment(dev)
    fig.update(preset=args.preset, batch=B, tokens_per_step=tokens, dtype=args.dtype, iters=args.iters,
               compile=args.compile, activation_checkpointing=args.activation_checkpointing,
               peak_tflops=peak / 1e12 if peak else None)
    print(f"preset {args.preset}: batch {B}, {tokens} tokens/step, {args.dtype}, {dev}, "
          f"{torch.get_num_threads()} threads, median of {args.iters}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}")
    hdr = (f"{'model':<18} {'total params':>13} {'activated':>11} {'step ms':>9} {'tokens/s':>10} "
           f"{'vs dense-eq':>12} {'MFU':>7}")
    print(hdr)
    print("-" * len(hdr))
    med = {r: statistics.median(v) * 1e3 for r, v in times.items()}
    for row, (name, compiled, matmul) in table.items():
        c = cfgs[name]
        pc = param_counts(c)
        ref = med["dense-eq+compile" if compiled else "dense-eq"]
        flops = train_step_flops(c, B, masked=not args.no_mask)
        util = mfu(flops, med[row] / 1e3, peak) if peak else None
        print(f"{row:<18} {pc.total / 1e6:>12.2f}M {pc.activated / 1e6:>10.2f}M {med[row]:>9.1f} "
              f"{tokens / med[row] * 1e3:>10.0f} {med[row] / ref:>11.3f}x "
              f"{'' if util is None else f'{util:.1%}':>7}")
        key = row.replace("-", "_").replace("+", "_")
        fig[f"{key}_step_ms"] = round(med[row], 3)
        fig[f"{key}_tokens_per_s"] = round(tokens / med[row] * 1e3, 1)
        fig[f"{key}_vs_dense_eq_ratio"] = round(med[row] / ref, 4)
        if util is not None:
            fig[f"{key}_mfu"] = round(util, 4)
        if compiled:
            fig[f"{key.removesuffix('_compile')}_compiled_vs_eager_ratio"] = round(
                med[row] / med[row.removesuffix("+compile")], 4)
        if matmul == "grouped_mm" and not compiled:
            fig[f"{name}_grouped_mm_vs_bmm_ratio"] = round(med[row] / med[name], 4)
    for a, b in (("ec", "dense-eq"), ("tc", "dense-eq"), ("ec", "dense"), ("tc", "ec")):
        if a in med and b in med:
            fig[f"{a}_vs_{b}_ratio".replace("-", "_")] = round(med[a] / med[b], 4)
    if "ec" in med:
        print(f"\nEC / dense at equal activated compute: {fig['ec_vs_dense_eq_ratio']:.3f}x (target <= 1.10)")
    for key in sorted(k for k in fig if k.endswith(("_compiled_vs_eager_ratio", "_grouped_mm_vs_bmm_ratio"))):
        print(f"{key}: {fig[key]:.3f}x")
    if args.profile is not None:
        fig["profile_row"] = args.profile
        fig["profile_top_kernels"] = top_kernels(lambda: step(args.profile), dev)
        print(f"\ntop kernels of one {args.profile} step:\n{fig['profile_top_kernels']}")
    write_json(args.out, fig)
    return fig


def top_kernels(fn, device: str, rows: int = 15) -> str:
    """The profiler's table of the `rows` most expensive kernels (device time; CPU time on CPU) of fn()."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)

if __name__ == "__main__":
    main()
