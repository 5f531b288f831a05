"""MoE FFN: router + dispatcher + grouped experts.

The experts are ONE module with stacked weights (w1 [E, D, F], w2 [E, F, D]) run as one batched
matmul over [E, X, D]; there is no Python loop over experts. The dispatcher is the seam for
expert parallelism: `LocalDispatcher` gathers each expert's slot tokens, runs the experts and
scatter-adds gate * output back; `parallel/` replaces `MoEFeedForward.dispatcher` with one that moves
the [E, X, D] slot tensor between expert-parallel ranks by all-to-all. Model code stays unaware of
process groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .routing import InferenceRouting, Router, RoutingPlan


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of an expert weight that parallel/ made a DTensor (sharded over experts)."""
    return t.to_local() if hasattr(t, "to_local") else t


def grouped_mm(a_EXI: torch.Tensor, b_EIJ: torch.Tensor) -> torch.Tensor:
    """[E, X, I] @ [E, I, J] -> [E, X, J] through `torch._grouped_mm` (one grouped GEMM; every group has
    X rows, so no offsets).

    The op takes fp32 / bf16 / fp16 with 16-byte aligned strides (bf16: I and J multiples of 8); on CUDA
    its fast CUTLASS kernel needs bf16 on sm90 / sm100, other cases fall back to plain matmuls. It is
    not an autocast op: under autocast both operands are cast to the autocast dtype here, as bmm would
    be. Its compile-time (meta) kernel accepts bf16 only, so a compiled fp32 forward uses bmm (the same
    product). Its backward needs a gradient with real strides (the MoE combine's gate product gives
    one; a bare `.sum()` of the output does not)."""
    dev = a_EXI.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else a_EXI.dtype
    a_EXI, b_EIJ = a_EXI.to(dt), b_EIJ.to(dt)
    if dt != torch.bfloat16 and torch.compiler.is_compiling():
        return torch.bmm(a_EXI, b_EIJ)
    return torch._grouped_mm(a_EXI, b_EIJ)


class GroupedExperts(nn.Module):
    """E GeLU FFN experts with stacked weights; forward maps [E, X, D] -> [E, X, D] by one batched
    matmul per layer: `torch.bmm` (default) or `torch._grouped_mm` (`matmul="grouped_mm"`).

    Each expert has exactly the parameters of the dense FFN: D*F + F*D (+ F + D with biases).
    Under expert parallelism the leading dim holds the E_local experts of this rank.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, bias: bool = True, matmul: str = "bmm"):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.matmul = matmul
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # [E, D, F]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # [E, F, D]
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None  # [E, F]
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None  # [E, D]

    def forward(self, x_EXD: torch.Tensor) -> torch.Tensor:
        w1, w2, b1, b2 = (_local(p) for p in (self.w1, self.w2, self.b1, self.b2))
        if self.matmul == "grouped_mm":
            h_EXF = grouped_mm(x_EXD, w1)
            h_EXF = F.gelu(h_EXF if b1 is None else h_EXF + b1.unsqueeze(1).to(h_EXF.dtype), approximate="tanh")
            y_EXD = grouped_mm(h_EXF, w2)
            return y_EXD if b2 is None else y_EXD + b2.unsqueeze(1).to(y_EXD.dtype)
        h_EXF = torch.bmm(x_EXD, w1) if b1 is None else torch.baddbmm(b1.unsqueeze(1), x_EXD, w1)
        h_EXF = F.gelu(h_EXF, approximate="tanh")
        return torch.bmm(h_EXF, w2) if b2 is None else torch.baddbmm(b2.unsqueeze(1), h_EXF, w2)  # [E, X, D]

    def init_weights(self) -> None:
        # Per expert the same distribution as the dense FFN's xavier-uniform Linear layers.
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)


class LocalDispatcher:
    """Single-process dispatch: gather -> experts -> weighted scatter-add.

    Subclasses (expert parallelism) override `dispatch` / `combine` and receive the same plan.
    """

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Tokens of every expert slot: [E, X, D]."""
        return x_TD[plan.idx_EX]

    def combine(self, y_EXD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """sum over the slots of each token of gate * expert output: [T, D]."""
        E, X, D = y_EXD.shape
        weighted = (y_EXD * plan.gate_EX.to(y_EXD.dtype).unsqueeze(-1)).reshape(E * X, D)
        return y_EXD.new_zeros(plan.num_tokens, D).index_add_(0, plan.idx_EX.reshape(-1), weighted)

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> torch.Tensor:
        return self.combine(experts(self.dispatch(x_TD, plan)), plan)


class MoEFeedForward(nn.Module):
    """MoE replacement of the dense FFN. forward(h, router_in, routing) with h the (normalised, modulated)
    FFN input and router_in the router input x' (Eq. 4), both [B, S, D], and `routing` the eval-mode
    InferenceRouting (None: the config's) -> (out [B, S, D], plan)."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, bias: bool = True):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, hidden, bias, cfg.expert_matmul)
        self.dispatcher = LocalDispatcher()

    def forward(self, h_BSD: torch.Tensor, router_in_BSD: torch.Tensor, routing: InferenceRouting | None = None,
                collect_stats: bool = True) -> tuple[torch.Tensor, RoutingPlan]:
        B, S, D = h_BSD.shape
        plan = self.router(router_in_BSD, routing, collect_stats)
        out_TD = self.dispatcher(h_BSD.reshape(B * S, D), plan, self.experts)
        return out_TD.view(B, S, D), plan
