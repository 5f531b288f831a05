"""The EC-DiT network (Section 2): (x_t, t, text) -> velocity.

Block: x = x + g1 * SelfAttn(AdaLN(x)); x = x + CrossAttn(x, text); x = x + g2 * FFN(AdaLN(x)),
the FFN being dense or, in every other block from the second, a MoE whose router sees x' (the tokens
after cross-attention, Eq. 4).

MaskDiT (drop-and-restore, see README): with `keep_idx` the blocks run on the kept tokens only and
the output is the kept tokens' prediction [B, K, P]; without it the full image [B, C, H, W].

Build on the meta device and initialise explicitly (see `build_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, SelfAttention
from .config import DiTConfig
from .layers import (AdaLNModulation, FeedForward, TimestepEmbedder, layer_norm, modulate, patchify,
                     sincos_pos_embed_2d, unpatchify, xavier_linear_)
from .moe import MoEFeedForward
from .routing import InferenceRouting, RoutingPlan


@dataclass
class DiTOutput:
    pred: torch.Tensor  # [B, C, H, W], or [B, K, P] when tokens were dropped
    aux_loss: torch.Tensor  # weighted sum of the MoE layers' auxiliary losses (scalar)
    moe_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)  # one dict per MoE layer


@dataclass
class TextCond:
    """Text conditioning of one forward: embeddings [B, L, Y], padding mask [B, L] (True = attend),
    CFG drop flags [B] and the learned null text [Y]."""

    ctx: torch.Tensor
    mask: torch.Tensor | None
    drop: torch.Tensor | None
    null: torch.Tensor


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, index: int):
        super().__init__()
        d = cfg.dim
        self.adaln = AdaLNModulation(d, 6)
        self.attn = SelfAttention(d, cfg.heads, cfg.kv_heads, cfg.qk_norm)
        self.cross = CrossAttention(d, cfg.text_dim, cfg.heads, cfg.qk_norm)
        self.is_moe = cfg.is_moe_block(index)
        if self.is_moe:
            self.ffn: nn.Module = MoEFeedForward(d, cfg.ffn_dim, cfg.moe, cfg.ffn_bias)
        else:
            self.ffn = FeedForward(d, cfg.dense_ffn_dim(index), cfg.ffn_bias)

    def forward(self, x_BSD: torch.Tensor, c_BD: torch.Tensor, text: "TextCond",
                routing: InferenceRouting | None = None, collect_stats: bool = True
                ) -> tuple[torch.Tensor, RoutingPlan | None]:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(c_BD)
        x = x_BSD + g1.unsqueeze(1) * self.attn(modulate(layer_norm(x_BSD), sh1, sc1))
        x = x + self.cross(x, text.ctx, text.mask, text.drop, text.null)  # x' = x_s + MHCA(x_s): router input
        h = modulate(layer_norm(x), sh2, sc2)
        plan = None
        if self.is_moe:
            f, plan = self.ffn(h, x, routing, collect_stats)
        else:
            f = self.ffn(h)
        return x + g2.unsqueeze(1) * f, plan


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) + Linear(d, p*p*C), zero-initialised."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.adaln = AdaLNModulation(dim, 2)
        self.proj = nn.Linear(dim, patch_dim)

    def forward(self, x_BSD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        """[B, S, P]. The bias is added out of place, so the result is not a view of the 2-D matmul: it is the
        model's output, on which FSDP2 registers its pre-backward hook (an in-place op on a view drops it)."""
        shift, scale = self.adaln(c_BD)
        out_BSP = F.linear(modulate(layer_norm(x_BSD), shift, scale), self.proj.weight)
        return out_BSP + self.proj.bias.to(out_BSP.dtype)

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        # Fixed 2-D sin-cos embedding; persistent so a checkpoint load restores it without init.
        self.register_buffer("pos_embed", torch.empty(cfg.num_tokens, cfg.dim))
        self.t_embed = TimestepEmbedder(cfg.dim, cfg.freq_dim)
        # Learned "null" text for classifier-free guidance: one token, the rest of the context masked.
        self.null_text = nn.Parameter(torch.empty(cfg.text_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.patch_dim)

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (after `to_empty`; the same on every rank given the
        same RNG state): xavier Linear layers, adaLN-Zero, zero final layer and cross-attn output."""
        xavier_linear_(self.patch_embed)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.dim, self.cfg.grid, device=self.pos_embed.device))
        nn.init.normal_(self.null_text, std=self.cfg.text_dim ** -0.5)
        for m in self.modules():
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    # ---- conditioning --------------------------------------------------------------------------
    @staticmethod
    def text_mask_with_drop(ctx_BLY: torch.Tensor, ctx_mask_BL: torch.Tensor | None,
                            drop_B: torch.Tensor | None) -> torch.Tensor | None:
        """Padding mask in which samples with drop_B=True see only position 0, where the
        cross-attention puts the learned null text (CFG)."""
        if drop_B is None:
            return ctx_mask_BL
        B, L, _ = ctx_BLY.shape
        if ctx_mask_BL is None:
            ctx_mask_BL = torch.ones(B, L, dtype=torch.bool, device=ctx_BLY.device)
        null_mask_L = torch.arange(L, device=ctx_BLY.device) == 0
        return torch.where(drop_B.view(B, 1), null_mask_L, ctx_mask_BL)

    def routers(self) -> list:
        """The Router of every MoE layer, in depth order."""
        return [blk.ffn.router for blk in self.blocks if blk.is_moe]

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, ctx_BLY: torch.Tensor,
                ctx_mask_BL: torch.Tensor | None = None, keep_idx_BK: torch.Tensor | None = None,
                text_drop_B: torch.Tensor | None = None, collect_stats: bool = True,
                routing: InferenceRouting | None = None) -> DiTOutput:
        """Prediction for x_t [B, C, H, W] at times t_B with text ctx_BLY; `routing` is the MoE routing of
        eval mode (None: the config's), its meter records every MoE layer's plan."""
        cfg = self.cfg
        x = self.patch_embed(patchify(x_BCHW, cfg.patch_size)) + self.pos_embed.to(x_BCHW.dtype)  # [B, S, D]
        if keep_idx_BK is not None:  # MaskDiT: keep only the sampled tokens
            x = torch.gather(x, 1, keep_idx_BK.unsqueeze(-1).expand(-1, -1, cfg.dim))  # [B, K, D]
        c = self.t_embed(t_B)  # [B, D]
        text = TextCond(ctx_BLY, self.text_mask_with_drop(ctx_BLY, ctx_mask_BL, text_drop_B), text_drop_B,
                        self.null_text)
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[dict[str, torch.Tensor]] = []
        meter = None if self.training or routing is None else routing.meter
        for blk in self.blocks:
            x, plan = blk(x, c, text, routing, collect_stats)
            if plan is not None:
                if meter is not None:
                    meter.record(len(stats), plan)
                aux = aux + plan.aux_loss
                stats.append(plan.stats)
        out = self.final(x, c)  # [B, S or K, P]
        if keep_idx_BK is None:
            out = unpatchify(out, cfg.patch_size, cfg.in_channels, cfg.grid)
        return DiTOutput(out, aux, stats)


def build_model(cfg: DiTConfig, device: str | torch.device = "cpu", seed: int | None = None) -> DiT:
    """Build on the meta device, materialise on `device`, and initialise (seeded if `seed` given)."""
    with torch.device("meta"):
        model = DiT(cfg)
    model.to_empty(device=device)
    if seed is None:
        model.init_weights()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_weights()
    return model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
