"""Routers: expert choice (EC-DiT, Section 2.3) and token choice top-k (GShard, the Table 4 baseline).

Both produce a `RoutingPlan` with static shapes: for every expert a fixed number X of slots, each slot
naming a token (index into the flattened local batch of T tokens) and its combine weight. The
dispatcher (moe.py, or an expert-parallel one from parallel/) gathers the slots' tokens into
[E, X, D], runs the experts, and scatter-adds gate * output back to the tokens.

Routing groups: the flattened tokens [B*S] are cut into N contiguous groups of G tokens
("tokens": G = group_size; "sample": G = S, one image; "batch": G = B*S). Each group is routed on
its own: in expert choice every expert takes exactly its top-C tokens of every group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


@dataclass
class RoutingPlan:
    """Static-shape token assignment for one MoE layer.

    idx_EX:   [E, X] token index in [0, T) of each expert slot (X = groups * capacity).
    gate_EX:  [E, X] combine weight of each slot (0 for an empty slot).
    valid_EX: [E, X] bool, False for empty slots (token choice under capacity); None = all valid.
    aux_loss: scalar auxiliary loss, already weighted (0 for expert choice).
    stats:    detached statistics for logging (see `routing_stats`).
    """

    idx_EX: torch.Tensor
    gate_EX: torch.Tensor
    valid_EX: torch.Tensor | None
    aux_loss: torch.Tensor
    num_tokens: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def routing_groups(batch: int, seq: int, mode: str, group_size: int) -> tuple[int, int]:
    """(N groups, G tokens per group) for `batch` images of `seq` tokens, flattened batch-major."""
    total = batch * seq
    if mode == "sample":
        return batch, seq
    if mode == "batch" or total <= group_size:
        return 1, total
    if total % group_size:
        raise ValueError(
            f"model.moe.group_size={group_size} must divide the {total} tokens of the local batch "
            f"({batch} images x {seq} tokens); change the batch size or group size, or route per sample")
    return total // group_size, group_size


def expert_choice(affinity_TE: torch.Tensor, groups: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes its top-`capacity` tokens by affinity within each group (Eq. 6).

    affinity_TE: [T, E] softmax over experts. Returns idx_EX, gate_EX of shape [E, groups*capacity];
    the gate is the affinity of the chosen token, so gradients reach the router through it.
    """
    T, E = affinity_TE.shape
    G = T // groups
    a_NEG = affinity_TE.view(groups, G, E).transpose(1, 2)  # [N, E, G]
    gate_NEC, pos_NEC = a_NEG.topk(capacity, dim=-1, sorted=False)  # [N, E, C]
    idx_NEC = pos_NEC + torch.arange(groups, device=pos_NEC.device).view(groups, 1, 1) * G
    return idx_NEC.permute(1, 0, 2).reshape(E, -1), gate_NEC.permute(1, 0, 2).reshape(E, -1)


def token_choice(probs_TE: torch.Tensor, groups: int, top_k: int, capacity: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GShard top-k with a per-group capacity per expert.

    Each token picks its top-k experts; gates are the chosen probabilities renormalised to sum to 1.
    Slots are filled in priority order (all first choices of a group in token order, then all second
    choices, ...); an assignment beyond the expert's capacity is dropped. A token whose assignments
    are all dropped gets a zero MoE output and passes through the residual unchanged.

    Returns idx_EX, gate_EX, valid_EX ([E, groups*capacity]) and keep_TK ([T, k] bool, assignment kept).
    """
    T, E = probs_TE.shape
    G = T // groups
    top_p_TK, top_e_TK = probs_TE.topk(top_k, dim=-1)  # [T, k]
    gate_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
    # Position of each assignment in its expert's queue, in priority order (choice rank, then token).
    e_NKG = top_e_TK.view(groups, G, top_k).transpose(1, 2)  # [N, k, G]
    onehot = F.one_hot(e_NKG.reshape(groups, top_k * G), E)  # [N, k*G, E]
    pos_NKG = ((onehot.cumsum(dim=1) - 1) * onehot).sum(-1).view(groups, top_k, G)
    keep_NKG = pos_NKG < capacity
    # Scatter kept assignments into [N, E*cap] slot tables; dropped ones go to a trash column.
    slot_NKG = torch.where(keep_NKG, e_NKG * capacity + pos_NKG, E * capacity)
    tok_NKG = (torch.arange(T, device=probs_TE.device).view(groups, 1, G)).expand(groups, top_k, G)
    gate_NKG = gate_TK.view(groups, G, top_k).transpose(1, 2)
    n_slots = E * capacity + 1
    base = torch.arange(groups, device=probs_TE.device).view(groups, 1) * G  # empty slots: group's 1st token
    idx = base.expand(groups, n_slots).clone().scatter_(1, slot_NKG.reshape(groups, -1), tok_NKG.reshape(groups, -1))
    gate = gate_TK.new_zeros(groups, n_slots).scatter(1, slot_NKG.reshape(groups, -1), gate_NKG.reshape(groups, -1))
    valid = torch.zeros(groups, n_slots, dtype=torch.bool, device=probs_TE.device)
    valid.scatter_(1, slot_NKG.reshape(groups, -1), True)

    def to_EX(t_NS: torch.Tensor) -> torch.Tensor:
        return t_NS[:, :-1].reshape(groups, E, capacity).transpose(0, 1).reshape(E, groups * capacity)

    keep_TK = keep_NKG.transpose(1, 2).reshape(T, top_k)
    return to_EX(idx), to_EX(gate), to_EX(valid), keep_TK


def load_balancing_loss(probs_TE: torch.Tensor, top1_T: torch.Tensor, groups: int) -> torch.Tensor:
    """GShard / Switch auxiliary loss: E * sum_e (fraction of tokens whose first choice is e) *
    (mean router probability of e), averaged over groups; 1.0 when perfectly uniform."""
    T, E = probs_TE.shape
    G = T // groups
    frac_NE = F.one_hot(top1_T.view(groups, G), E).float().mean(1)  # [N, E], no gradient
    mean_p_NE = probs_TE.view(groups, G, E).mean(1)  # [N, E]
    return E * (frac_NE * mean_p_NE).sum(-1).mean()


@torch.no_grad()
def routing_stats(plan_idx_EX: torch.Tensor, valid_EX: torch.Tensor | None, probs_TE: torch.Tensor,
                  num_tokens: int) -> dict[str, torch.Tensor]:
    """tokens_per_expert [E]; expert_count [T] (how many experts took each token: the paper's Fig. 6
    heatmap); experts_per_token_frac [E+1] (fraction of tokens taken by 0, 1, ..., E experts);
    router_entropy (mean over tokens of the affinity entropy, nats)."""
    E = plan_idx_EX.shape[0]
    ones = torch.ones_like(plan_idx_EX, dtype=torch.float32) if valid_EX is None else valid_EX.float()
    tokens_per_expert = ones.sum(1)
    count_T = torch.zeros(num_tokens, device=plan_idx_EX.device).index_add_(0, plan_idx_EX.reshape(-1), ones.reshape(-1))
    count_T = count_T.long()
    frac = torch.bincount(count_T, minlength=E + 1).float() / num_tokens
    entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
    return {"tokens_per_expert": tokens_per_expert, "expert_count": count_T,
            "experts_per_token_frac": frac, "router_entropy": entropy}


class Router(nn.Module):
    """Router of one MoE layer: W_r [D, E] on the router input x' (Eq. 4-5), then expert or token choice.

    The routing group comes from the config: `group`/`group_size` in training mode,
    `inference_group`/`inference_group_size` in eval mode (see `set_inference_group`).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))  # [E, D]
        self.inference_group = cfg.inference_group
        self.inference_group_size = cfg.inference_group_size

    def set_inference_group(self, mode: str, group_size: int | None = None) -> None:
        self.inference_group = mode
        if group_size is not None:
            self.inference_group_size = group_size

    def group_for(self, batch: int, seq: int) -> tuple[int, int]:
        if self.training:
            return routing_groups(batch, seq, self.cfg.group, self.cfg.group_size)
        return routing_groups(batch, seq, self.inference_group, self.inference_group_size)

    def forward(self, x_BSD: torch.Tensor, collect_stats: bool = True) -> RoutingPlan:
        B, S, D = x_BSD.shape
        T = B * S
        groups, G = self.group_for(B, S)
        # Router in (at least) fp32: affinities decide discrete choices; keep them stable under bf16.
        dt = torch.promote_types(x_BSD.dtype, torch.float32)
        with torch.autocast(x_BSD.device.type, enabled=False):
            logits_TE = F.linear(x_BSD.reshape(T, D).to(dt), self.weight.to(dt))
        probs_TE = logits_TE.softmax(dim=-1)  # affinity A (Eq. 5)
        cap = self.cfg.capacity(G)
        if self.cfg.router == "expert_choice":
            idx, gate = expert_choice(probs_TE, groups, cap)
            valid, aux = None, probs_TE.new_zeros(())
            extra = {}
        else:
            idx, gate, valid, keep_TK = token_choice(probs_TE, groups, self.cfg.top_k, cap)
            aux = self.cfg.aux_loss_weight * load_balancing_loss(probs_TE, probs_TE.argmax(-1), groups)
            extra = {"drop_rate": 1.0 - keep_TK.float().mean().detach(), "aux_loss": aux.detach()}
        stats = {}
        if collect_stats:
            stats = routing_stats(idx, valid, probs_TE.detach(), T)
            stats.update(extra)
            stats["capacity"] = torch.tensor(float(cap))
        return RoutingPlan(idx, gate, valid, aux, T, stats)

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


__all__ = ["RoutingPlan", "Router", "routing_groups", "expert_choice", "token_choice",
           "load_balancing_loss", "routing_stats"]
