"""Building blocks of the DiT: FFN, timestep embedder, AdaLN modulation, position embedding, patches.

No module initialises weights in ``__init__`` (models are built on the meta device); each has
``init_weights()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x_BSD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
    return torch.addcmul(shift_BD.unsqueeze(1), x_BSD, 1 + scale_BD.unsqueeze(1))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (AdaLN supplies scale and shift), eps as in DiT."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def xavier_linear_(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class FeedForward(nn.Module):
    """Dense FFN: GeLU(x W1 + b1) W2 + b2 with hidden width F (4d in the paper)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BSD), approximate="tanh"))

    def init_weights(self) -> None:
        xavier_linear_(self.fc1)
        xavier_linear_(self.fc2)


def timestep_features(t_B: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of flow time t in [0, 1] (scaled by 1000 as in DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = (t_B.float() * 1000.0)[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> 2-layer MLP (SiLU) of width d (Section 2.3)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t_B, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(feats)))  # [B, D]

    def init_weights(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(d, n*d): n shift/scale/gate vectors from the conditioning; zero-initialised
    (adaLN-Zero), so every residual branch starts as the identity."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.proj = nn.Linear(dim, n * dim)

    def forward(self, c_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(F.silu(c_BD)).chunk(self.n, dim=-1)

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


def sincos_pos_embed_2d(dim: int, grid: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (DiT / MAE), row-major token order."""
    if dim % 4:
        raise ValueError(f"position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    coords = torch.arange(grid, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # [S, quarter]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed(xx), embed(yy)], dim=1).float()  # [S, dim]


def patchify(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, S, P] (P = p*p*C) with S = (H/p)*(W/p) in row-major order."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x_BSP: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: [B, S, P] -> [B, C, grid*p, grid*p]."""
    B = x_BSP.shape[0]
    x = x_BSP.reshape(B, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * p, grid * p)
