"""CPU smoke run of the model alone (the README main job until the training app lands): trains a small
EC-DiT on a few fixed random latents with the masked rectified-flow loss, then samples with CFG.

    python -m train.smoke [--preset small-ec] [--steps 60] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import ConfigError, get_preset
from model.dit import build_model
from model.flow import FlowConfig, cfg_velocity, euler_sample, flow_loss
from model.params import param_counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-ec")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    try:
        cfg = get_preset(args.preset)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    pc = param_counts(cfg)
    print(f"[smoke] {cfg.name}: {pc.total / 1e6:.2f}M params ({pc.activated / 1e6:.2f}M activated), "
          f"{cfg.kept_tokens}/{cfg.num_tokens} tokens per image in training")
    x0 = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size).clamp(-2, 2)
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = flow_loss(model, x0, ctx, None, FlowConfig())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == 1:
            load = out["out"].moe_stats[0]["experts_per_token_frac"] if out["out"].moe_stats else None
            extra = "" if load is None else f"  layer-2 tokens by 0/1/2+ experts {load[0]:.2f}/{load[1]:.2f}/{load[2:].sum():.2f}"
            print(f"[smoke] step {step:4d}  loss {out['flow_loss'].item():.4f}  "
                  f"{step / (time.perf_counter() - t0):.2f} step/s{extra}")
    model.eval()
    model.set_inference_routing("sample")
    t1 = time.perf_counter()
    img = euler_sample(cfg_velocity(model, ctx[:2], None, 4.0), torch.randn_like(x0[:2]), steps=10)
    print(f"[smoke] sampled {tuple(img.shape)} with CFG 4.0, 10 Euler steps in {time.perf_counter() - t1:.1f}s; done")


if __name__ == "__main__":
    main()
