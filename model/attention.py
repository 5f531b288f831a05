"""Self-attention with grouped-query attention and cross-attention to text, on
``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels where available)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import xavier_linear_


class SelfAttention(nn.Module):
    """Multi-head self-attention with `kv_heads` key/value heads (GQA) and optional QK RMSNorm."""

    def __init__(self, dim: int, heads: int, kv_heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q = self.q(x_BSD).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, S, head_dim]
        k, v = self.kv(x_BSD).view(B, S, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, kv_heads, S, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.heads)  # [B, heads, S, head_dim]
        return self.out(o.transpose(1, 2).reshape(B, S, D))

    def init_weights(self) -> None:
        for lin in (self.q, self.kv, self.out):
            xavier_linear_(lin)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, nn.RMSNorm):
                nn.init.ones_(norm.weight)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to text embeddings (Eq. 2-3): queries from x
    (d -> d), keys and values from the text (d_y -> d); a padding mask hides unused text positions.

    Classifier-free guidance: for samples with drop_B, the keys/values of text position 0 are those of
    the learned null text `null_Y` (the caller masks the other positions). Swapping after the
    projection keeps the frozen text out of autograd, so backward computes no gradient for the
    [B, L, Y] text, only for the one null token.
    """

    def __init__(self, dim: int, text_dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x_BSD: torch.Tensor, ctx_BLY: torch.Tensor, ctx_mask_BL: torch.Tensor | None,
                drop_B: torch.Tensor | None = None, null_Y: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        L = ctx_BLY.shape[1]
        q = self.q(x_BSD).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, S, head_dim]
        kv_BL2D = self.kv(ctx_BLY)  # [B, L, 2D]
        if drop_B is not None:
            kv_null = self.kv(null_Y.to(ctx_BLY.dtype))  # [2D]
            first_L = torch.arange(L, device=ctx_BLY.device) == 0
            kv_BL2D = torch.where((drop_B.view(B, 1) & first_L).unsqueeze(-1), kv_null, kv_BL2D)
        k, v = kv_BL2D.view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, heads, L, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if ctx_mask_BL is None else ctx_mask_BL[:, None, None, :]  # [B, 1, 1, L] True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, S, D))

    def init_weights(self) -> None:
        for lin in (self.q, self.kv):
            xavier_linear_(lin)
        # Zero output projection (as PixArt): the cross-attention branch starts as the identity.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, nn.RMSNorm):
                nn.init.ones_(norm.weight)
