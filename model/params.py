"""Parameter accounting for a config, on the meta device (no memory is allocated).

total: every trainable parameter of the transformer. activated: the parameters one token goes
through on average: the experts count f_c times per MoE layer (expert choice) or top_k times (token
choice) instead of E times. The paper's Table 1 totals appear to include the frozen encoders, so
`with_encoders` adds the 670M T5 and the 34M VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import T5_PARAMS, VAE_PARAMS, DiTConfig, dense_twin
from .dit import DiT, count_params


def ffn_params(dim: int, hidden: int, bias: bool) -> int:
    """One GeLU FFN (= one expert): D*F + F*D, plus F + D with biases."""
    return 2 * dim * hidden + (hidden + dim if bias else 0)


@dataclass
class ParamCounts:
    total: int
    dense_twin: int  # same backbone with dense FFNs
    experts: int  # all expert parameters
    routers: int
    activated: int

    @property
    def with_encoders(self) -> int:
        return self.total + T5_PARAMS + VAE_PARAMS

    @property
    def activated_with_encoders(self) -> int:
        return self.activated + T5_PARAMS + VAE_PARAMS


def build_meta(cfg: DiTConfig) -> DiT:
    with torch.device("meta"):
        return DiT(cfg)


def param_counts(cfg: DiTConfig) -> ParamCounts:
    model = build_meta(cfg)
    total = count_params(model)
    if cfg.moe is None:
        return ParamCounts(total, total, 0, 0, total)
    moe_layers = [blk.ffn for blk in model.blocks if blk.is_moe]
    experts = sum(count_params(m.experts) for m in moe_layers)
    routers = sum(count_params(m.router) for m in moe_layers)
    one_ffn = ffn_params(cfg.dim, cfg.ffn_dim, cfg.ffn_bias)
    activated = total - experts + round(len(moe_layers) * cfg.moe.experts_per_token * one_ffn)
    return ParamCounts(total, count_params(build_meta(dense_twin(cfg))), experts, routers, activated)
