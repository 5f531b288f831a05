"""FLOPs of a training step and of a sampling step, from the config (matmuls and attention, 2*m*n*k).

Counted: patch and timestep embedders, adaLN projections, self-attention (GQA projections + scores
and values), cross-attention (with the text length), dense FFNs, routers and the expert slots that
run (expert choice: E*Q per group, i.e. f_c per token; token choice: all capacity slots, used or
not), DiffMoE's capacity predictor, and the final layer. Elementwise work (norms, softmax, GeLU,
gathers) is not counted, as usual for MFU. Backward = 2x forward, except layers whose input needs no gradient (the patch embedding, the
timestep MLP's first layer, the text key/value projections: frozen text encoder), which compute only
the weight gradient (1x). This is what autograd executes, and what FlopCounterMode counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import DiTConfig
from .routing import routing_groups


@dataclass
class StepFlops:
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _expert_slots(cfg: DiTConfig, batch: int, tokens: int, training: bool) -> int:
    """Expert slots run by one MoE layer for `batch` images of `tokens` tokens."""
    moe = cfg.moe
    mode, size = (moe.group, moe.group_size) if training else (moe.inference_group, moe.inference_group_size)
    groups, G = routing_groups(batch, tokens, mode, size)
    return groups * moe.num_experts * moe.capacity(G)


def model_flops(cfg: DiTConfig, batch: int, tokens: int, text_len: int | None = None,
                training: bool = True, text_drop: bool = True,
                expert_slots: Sequence[float] | None = None) -> StepFlops:
    """FLOPs of one forward (+ backward) of `batch` images with `tokens` tokens each. `text_drop`: the
    forward takes CFG drop flags (training with text dropout, or CFG sampling), which projects the
    null text once per block. `expert_slots[i]`: expert slots run at MoE layer i, when measured (dynamic
    inference); default: from the routing group of the config."""
    L = cfg.text_len if text_len is None else text_len
    B, T, S, d, P = batch, tokens, cfg.num_tokens, cfg.dim, cfg.patch_dim
    kv_dim = 2 * cfg.kv_heads * cfg.head_dim
    fwd2 = 0  # forward flops of layers whose backward is 2x
    fwd1 = 0  # forward flops of layers whose input needs no gradient (backward 1x)
    fwd1 += 2 * B * S * P * d  # patch embedding: every token, before MaskDiT dropping
    fwd1 += 2 * B * cfg.freq_dim * d  # timestep MLP layer 1 (sinusoidal features)
    fwd2 += 2 * B * d * d  # timestep MLP layer 2
    moe_layer = 0
    for i in range(cfg.depth):
        fwd2 += 2 * B * d * 6 * d  # adaLN
        fwd2 += 2 * B * T * d * (2 * d + kv_dim)  # self-attn q, kv, out
        fwd2 += 4 * B * T * T * d  # self-attn scores + values
        fwd2 += 2 * B * T * d * 2 * d  # cross-attn q, out
        fwd1 += 2 * B * L * cfg.text_dim * 2 * d  # cross-attn kv from the frozen text embeddings
        fwd2 += 2 * cfg.text_dim * 2 * d if text_drop else 0  # kv of the learned null text
        fwd2 += 4 * B * T * L * d  # cross-attn scores + values
        if cfg.is_moe_block(i):
            fwd2 += 2 * B * T * d * cfg.moe.num_experts  # router
            if cfg.moe.router == "diffmoe":  # capacity predictor on the detached router input
                h = cfg.moe.predictor_hidden or d
                fwd1 += 2 * B * T * d * h
                fwd2 += 2 * B * T * h * cfg.moe.num_experts
            slots = _expert_slots(cfg, B, T, training) if expert_slots is None else expert_slots[moe_layer]
            fwd2 += round(4 * slots * d * cfg.ffn_dim)  # experts
            moe_layer += 1
        else:
            fwd2 += 4 * B * T * d * cfg.dense_ffn_dim(i)
    fwd2 += 2 * B * d * 2 * d + 2 * B * T * d * P  # final adaLN + projection
    forward = fwd1 + fwd2
    return StepFlops(forward, (fwd1 + 2 * fwd2) if training else 0)


def train_step_flops(cfg: DiTConfig, batch: int, masked: bool = True, text_len: int | None = None,
                     text_drop: bool = True) -> int:
    """Forward + backward FLOPs of one training step (MaskDiT: kept tokens only when `masked`)."""
    tokens = cfg.kept_tokens if masked and cfg.mask_ratio > 0 else cfg.num_tokens
    return model_flops(cfg, batch, tokens, text_len, training=True, text_drop=text_drop).total


def sample_step_flops(cfg: DiTConfig, batch: int, guidance: bool = True, text_len: int | None = None) -> int:
    """FLOPs of one sampling (Euler) step: a forward on all tokens, conditional + unconditional if CFG."""
    n = 2 * batch if guidance else batch
    return model_flops(cfg, n, cfg.num_tokens, text_len, training=False, text_drop=guidance).forward


def sample_flops_per_image(cfg: DiTConfig, routing: str = "sample", experts_per_token: Sequence[float] | None = None,
                           guidance: bool = True, text_len: int | None = None, group_size: int | None = None) -> int:
    """FLOPs of one sampling step per image under an inference routing mode. Fixed modes count the slots
    the group's capacity runs ("tokens": groups of `group_size`, default the config's, over a large batch;
    "sample": one image). "dynamic" needs `experts_per_token` (per MoE layer, measured while sampling)."""
    S, n = cfg.num_tokens, 2 if guidance else 1
    if cfg.moe is not None and experts_per_token is None:
        if routing == "dynamic":
            raise ValueError("routing='dynamic' needs the measured experts_per_token of each MoE layer")
        G = S if routing == "sample" else (group_size or cfg.moe.inference_group_size)
        experts_per_token = [cfg.moe.num_experts * cfg.moe.capacity(G) / G] * cfg.num_moe_blocks
    slots = None if cfg.moe is None else [e * n * S for e in experts_per_token]
    return model_flops(cfg, n, S, text_len, training=False, text_drop=guidance, expert_slots=slots).forward


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved / peak."""
    return flops_per_step / seconds_per_step / peak_flops_per_s
