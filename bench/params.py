"""Parameter table of every preset next to the paper's Table 1, built on the meta device.

    python bench/params.py [--out params.json] [--preset NAME ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, parser, write_json  # noqa: E402
from model.config import PAPER_ACTIVATED_B, PAPER_TOTAL_B, PRESETS, get_preset  # noqa: E402
from model.params import param_counts  # noqa: E402


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], "all")
    p.add_argument("--include-small", action="store_true", help="also list the tiny/small CPU presets")
    args = p.parse_args(argv)
    names = [n for n in PRESETS if args.include_small or not n.startswith(("tiny", "small"))]
    if args.preset != "all":
        names = [args.preset]
    figures: dict = environment("meta")
    hdr = (f"{'preset':<12} {'layers':>6} {'d':>5} {'E':>3} {'moe':>4} {'transformer':>12} {'+T5+VAE':>9} "
           f"{'paper':>7} {'activated':>10} {'+enc':>7} {'paper':>6} {'build s':>7}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        cfg = get_preset(name)
        t0 = time.perf_counter()
        pc = param_counts(cfg)
        dt = time.perf_counter() - t0
        size = name.split("-")[1]
        paper_act = PAPER_ACTIVATED_B.get(size) if cfg.moe is not None and name.startswith("ec") else None
        E = cfg.moe.num_experts if cfg.moe else 1
        print(f"{name:<12} {cfg.depth:>6} {cfg.dim:>5} {E:>3} {cfg.num_moe_blocks:>4} {pc.total / 1e9:>11.3f}B "
              f"{pc.with_encoders / 1e9:>8.2f}B {PAPER_TOTAL_B.get(name, float('nan')):>6.2f}B "
              f"{pc.activated / 1e9:>9.3f}B {pc.activated_with_encoders / 1e9:>6.2f}B "
              f"{paper_act if paper_act else float('nan'):>5.2f}B {dt:>7.2f}")
        key = name.replace("-", "_")
        figures.update({f"{key}_total_params": pc.total, f"{key}_total_with_encoders_params": pc.with_encoders,
                        f"{key}_activated_params": pc.activated, f"{key}_build_s": round(dt, 3)})
        if name in PAPER_TOTAL_B:
            figures[f"{key}_total_vs_paper_ratio"] = round(pc.with_encoders / (PAPER_TOTAL_B[name] * 1e9), 4)
    print("\ntransformer = trainable DiT parameters; +T5+VAE adds the frozen 670M T5 and 34M VAE the paper counts;"
          "\nactivated = experts counted f_c = 2 times (expert choice) / top_k times (token choice) per MoE layer.")
    write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
