"""Test helpers for model tests."""

import torch

from model.config import get_preset
from model.dit import build_model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-zero random weights everywhere (the real init zeroes adaLN and the final layer, which would
    make every output trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def tiny_model(name="tiny-ec", seed=0, dtype=torch.float64, **overrides):
    cfg = get_preset(name, **overrides)
    return randomize(build_model(cfg, seed=seed).to(dtype), seed), cfg


def tiny_batch(cfg, B, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    mask = torch.ones(B, cfg.text_len, dtype=torch.bool)
    mask[:, cfg.text_len // 2:] = torch.rand(B, cfg.text_len - cfg.text_len // 2, generator=g) < 0.5
    return x, t, ctx, mask
