"""Rectified flow (Section 2.1): objective, timestep density, MaskDiT masking, Euler sampler with CFG.

Convention: t = 0 is data, t = 1 is noise; x_t = (1 - t) * x0 + t * eps and the network predicts the
velocity v = eps - x0 (the straight path's direction). Sampling integrates dx/dt = v from t = 1 to 0.
The network is any module with DiT's forward signature; this file knows nothing of its inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError
from .layers import patchify


@dataclass
class FlowConfig:
    t_mean: float = 0.0  # logit-normal timestep density: t = sigmoid(u), u ~ N(t_mean, t_std)
    t_std: float = 1.0
    text_drop_prob: float = 0.1  # probability of replacing a caption by the null text (CFG training)

    def validate(self) -> "FlowConfig":
        if self.t_std <= 0:
            raise ConfigError(f"flow.t_std={self.t_std} must be > 0")
        if not 0.0 <= self.text_drop_prob < 1.0:
            raise ConfigError(f"flow.text_drop_prob={self.text_drop_prob} must be in [0, 1)")
        return self


def sample_t(n: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Logit-normal timesteps [n] in (0, 1)."""
    u = torch.randn(n, generator=generator, device=device) * cfg.t_std + cfg.t_mean
    return torch.sigmoid(u)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * noise, t broadcast over all non-batch dims."""
    t = t_B.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def random_keep_indices(batch: int, num_tokens: int, keep: int, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """MaskDiT: for each image, the sorted indices [B, keep] of a uniformly random subset of tokens."""
    scores = torch.rand(batch, num_tokens, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def flow_loss(model, x0_BCHW: torch.Tensor, ctx_BLY: torch.Tensor, ctx_mask_BL: torch.Tensor | None,
              cfg: FlowConfig, mask_tokens: bool = True, generator: torch.Generator | None = None,
              collect_stats: bool = True) -> dict:
    """Masked rectified-flow loss: mean squared velocity error over the kept tokens (all tokens if
    `mask_tokens` is False or the model's mask_ratio is 0), plus the MoE auxiliary loss.

    Returns {"loss": total, "flow_loss", "aux_loss", "t": [B], "out": DiTOutput}.
    """
    mcfg = model.cfg
    B, dev = x0_BCHW.shape[0], x0_BCHW.device
    t = sample_t(B, cfg, generator, device=dev)
    noise = torch.randn(x0_BCHW.shape, generator=generator, device=dev, dtype=x0_BCHW.dtype)
    x_t = interpolate(x0_BCHW, noise, t)
    target = noise - x0_BCHW  # [B, C, H, W]
    drop = None
    if cfg.text_drop_prob > 0:
        drop = torch.rand(B, generator=generator, device=dev) < cfg.text_drop_prob
    keep = None
    if mask_tokens and mcfg.mask_ratio > 0:
        keep = random_keep_indices(B, mcfg.num_tokens, mcfg.kept_tokens, generator, device=dev)
    out = model(x_t, t, ctx_BLY, ctx_mask_BL, keep_idx_BK=keep, text_drop_B=drop, collect_stats=collect_stats)
    if keep is None:
        err = (out.pred.float() - target.float()).pow(2)
    else:
        target_BKP = torch.gather(patchify(target, mcfg.patch_size), 1,
                                  keep.unsqueeze(-1).expand(-1, -1, mcfg.patch_dim))
        err = (out.pred.float() - target_BKP.float()).pow(2)
    flow = err.mean()
    return {"loss": flow + out.aux_loss, "flow_loss": flow.detach(), "aux_loss": out.aux_loss.detach(),
            "t": t, "out": out}


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], t [B]) -> v


def cfg_velocity(model, ctx_BLY: torch.Tensor, ctx_mask_BL: torch.Tensor | None, guidance: float) -> VelocityFn:
    """Velocity with classifier-free guidance: v_u + s * (v_c - v_u). Conditional and unconditional
    (null text) predictions run as one batch of 2B; guidance 0 = unconditional."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        mask = None if ctx_mask_BL is None else torch.cat([ctx_mask_BL, ctx_mask_BL])
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx_BLY, ctx_BLY]), mask,
                  text_drop_B=drop, collect_stats=False).pred
        v_c, v_u = v[:B], v[B:]
        return v_u + guidance * (v_c - v_u)

    return velocity


def timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps+1 times from 1 to 0; `shift` > 1 spends more steps at high noise (SD3's time shift)."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) with `steps` Euler steps."""
    if steps < 1:
        raise ValueError(f"sampling steps={steps} must be >= 1")
    ts = timesteps(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * velocity(x, t)
    return x
