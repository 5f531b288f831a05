"""Routers: expert choice (EC-DiT, Section 2.3), token choice top-k (GShard, the Table 4 baseline) and
DiffMoE (expert choice over a batch-level token pool + a capacity predictor for dynamic inference).

Both produce a `RoutingPlan` with static shapes: for every expert a fixed number X of slots, each slot
naming a token (index into the flattened local batch of T tokens) and its combine weight. The
dispatcher (moe.py, or an expert-parallel one from parallel/) gathers the slots' tokens into
[E, X, D], runs the experts, and scatter-adds gate * output back to the tokens.

Routing groups: the flattened tokens [B*S] are cut into N contiguous groups of G tokens
("tokens": G = group_size; "sample": G = S, one image; "batch": G = B*S). Each group is routed on
its own: in expert choice every expert takes exactly its top-C tokens of every group.

Inference modes (eval): a routing group as above ("tokens" = the paper's G tokens across the batch,
"sample" = capacity per image), or "dynamic": each expert takes the tokens whose score passes its
threshold (an EMA of training-time cut-offs), so a token's experts depend on that token only. The
"dynamic" plan is padded to the busiest expert's count (empty slots have gate 0); it needs a host sync
and is meant for sampling, not for the expert-parallel training path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MoEConfig


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


def global_expert_choice(affinity_TE: torch.Tensor, pooled_TE: torch.Tensor, capacity: int, slots: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert choice over a pool larger than the local tokens (DiffMoE's global pool across ranks).

    affinity_TE: [T, E] local affinities (with gradient); pooled_TE: [T_pool, E] the affinities of the
    whole pool (the local ones included, no gradient). Each expert takes its top-`capacity` tokens of the
    pool; locally that is the tokens whose affinity reaches the expert's pool cut-off, of which at most
    `slots` (the static local shape) are kept. Returns idx_EX, gate_EX, valid_EX ([E, slots]) and the
    cut-off [E].
    """
    cutoff_E = pooled_TE.topk(capacity, dim=0).values[-1]  # [E] the C-th best affinity of the pool
    gate_EX, idx_EX = affinity_TE.t().topk(slots, dim=1)  # [E, X] best local candidates
    valid_EX = gate_EX >= cutoff_E.unsqueeze(1)
    return idx_EX, gate_EX * valid_EX, valid_EX, cutoff_E


def selected_plan(select_TE: torch.Tensor, gate_TE: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan of an arbitrary selection: expert e processes the tokens with select_TE[:, e] (dynamic
    inference). Padded to the busiest expert: idx_EX, gate_EX, valid_EX of shape [E, X], X = max count."""
    X = max(1, int(select_TE.sum(0).max()))
    sel_EX, idx_EX = select_TE.t().float().topk(X, dim=1)  # selected tokens first
    valid_EX = sel_EX > 0
    return idx_EX, gate_TE.t().gather(1, idx_EX) * valid_EX, valid_EX


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
    count_T = ones.new_zeros(num_tokens).index_add_(0, plan_idx_EX.reshape(-1), ones.reshape(-1))
    count_T = count_T.long()
    # A static-shape histogram (bincount's output shape depends on the data: a torch.compile graph break).
    ones_T = torch.ones_like(count_T, dtype=torch.float32)
    frac = ones_T.new_zeros(E + 1).index_add_(0, count_T, ones_T) / num_tokens
    entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
    return {"tokens_per_expert": tokens_per_expert, "expert_count": count_T,
            "experts_per_token_frac": frac, "router_entropy": entropy}


class CapacityPredictor(nn.Module):
    """DiffMoE's capacity predictor: MLP D -> H -> E on the detached router input, the logit of "expert e
    takes this token". Trained with BCE against the training-time expert choice; it never sends a
    gradient into the network."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_TD), approximate="tanh"))  # [T, E] logits

    def init_weights(self) -> None:
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)


class LocalPool:
    """The routing pool of one process (default). parallel/ installs a pool spanning the data-parallel
    ranks: `gather` all-gathers [T, E] scores (no gradient), `mean` all-reduces the cut-offs."""

    world = 1

    def gather(self, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t


def _in_backward() -> bool:
    """True while autograd runs a backward (e.g. activation-checkpoint recomputation of a forward).

    Under torch.compile the forward is traced once and its side effects (the threshold update) run
    once per call; activation checkpointing compiled with the block (parallel/compile.py compiles the
    checkpointed block) recomputes inside the compiled backward without replaying them."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """Router of one MoE layer: W_r [D, E] on the router input x' (Eq. 4-5), then expert or token choice.

    The routing group comes from the config: `group`/`group_size` in training mode,
    `inference_group`/`inference_group_size` in eval mode (see `set_inference_group`). Expert-choice
    routers keep `threshold_E` [E], the EMA of the training-time cut-off scores, for "dynamic" inference;
    diffmoe adds the capacity predictor, whose BCE loss is returned as the plan's aux_loss.
    `load_meter`: a list to which eval forwards append (slots run, slots used (int or 0-d tensor), tokens).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))  # [E, D]
        self.predictor = (CapacityPredictor(dim, cfg.predictor_hidden or dim, cfg.num_experts)
                          if cfg.router == "diffmoe" else None)
        self.register_buffer("threshold_E", torch.empty(cfg.num_experts))
        self.register_buffer("threshold_updates", torch.empty(()))
        self.inference_group = cfg.inference_group
        self.inference_group_size = cfg.inference_group_size
        self.dynamic_multiplier = cfg.dynamic_multiplier
        self.pool = LocalPool()
        self.load_meter: list[tuple[int, int | torch.Tensor, int]] | None = None

    def set_inference_group(self, mode: str, group_size: int | None = None,
                            multiplier: float | None = None) -> None:
        self.inference_group = mode
        if group_size is not None:
            self.inference_group_size = group_size
        if multiplier is not None:
            self.dynamic_multiplier = multiplier

    def group_for(self, batch: int, seq: int) -> tuple[int, int]:
        if self.training:
            return routing_groups(batch, seq, self.cfg.group, self.cfg.group_size)
        return routing_groups(batch, seq, self.inference_group, self.inference_group_size)

    def forward(self, x_BSD: torch.Tensor, collect_stats: bool = True) -> RoutingPlan:
        B, S, D = x_BSD.shape
        T = B * S
        # Router in (at least) fp32: affinities decide discrete choices; keep them stable under bf16.
        dt = torch.promote_types(x_BSD.dtype, torch.float32)
        with torch.autocast(x_BSD.device.type, enabled=False):
            x_TD = x_BSD.reshape(T, D).to(dt)
            logits_TE = F.linear(x_TD, self.weight.to(dt))
            pred_TE = None if self.predictor is None else self.predictor(x_TD.detach())  # [T, E] logits
        probs_TE = logits_TE.softmax(dim=-1)  # affinity A (Eq. 5)
        if not self.training and self.inference_group == "dynamic":
            return self._dynamic(probs_TE, pred_TE, collect_stats)
        groups, G = self.group_for(B, S)
        cap = self.cfg.capacity(G)
        extra: dict[str, torch.Tensor] = {}
        valid, aux = None, probs_TE.new_zeros(())
        if self.cfg.router == "token_choice":
            idx, gate, valid, keep_TK = token_choice(probs_TE, groups, self.cfg.top_k, cap)
            aux = self.cfg.aux_loss_weight * load_balancing_loss(probs_TE, probs_TE.argmax(-1), groups)
            extra = {"drop_rate": 1.0 - keep_TK.float().mean().detach(), "aux_loss": aux.detach()}
        elif not self.training:
            idx, gate = expert_choice(probs_TE, groups, cap)
        else:
            # Score whose training-time cut-off each expert's threshold tracks (dynamic inference).
            score_TE = probs_TE.detach() if pred_TE is None else pred_TE.detach().sigmoid()
            if self.cfg.global_pool and self.pool.world > 1:
                pooled = self.pool.gather(torch.cat([probs_TE.detach(), score_TE], dim=1))  # [W*T, 2E]
                E = self.cfg.num_experts
                cap = self.cfg.capacity(pooled.shape[0])
                slots = min(T, math.ceil(self.cfg.pool_slack * self.cfg.capacity(T)))
                idx, gate, valid, cut_E = global_expert_choice(probs_TE, pooled[:, :E], cap, slots)
                extra["pool_overflow"] = 1.0 - valid.sum() / (probs_TE.detach() >= cut_E).sum().clamp_min(1)
                score_cut_E = pooled[:, E:].topk(cap, dim=0).values[-1]
            else:
                idx, gate = expert_choice(probs_TE, groups, cap)
                # EC: the chosen gates are the top-C affinities, so their group minimum is the cut-off.
                cut_E = (gate.detach().view(-1, groups, cap).amin(-1).mean(-1) if pred_TE is None
                         else _group_cutoff(score_TE, groups, cap))
                score_cut_E = self.pool.mean(cut_E)
            self._track_threshold(score_cut_E)
            extra["threshold_mean"] = self.threshold_E.mean()
            if pred_TE is not None:
                aux, extra_pred = self._predictor_loss(pred_TE, idx, valid, groups, self.cfg.capacity(G))
                extra.update(extra_pred)
        if not self.training:
            self._meter(idx, valid, T)
        stats = {}
        if collect_stats:
            stats = routing_stats(idx, valid, probs_TE.detach(), T)
            stats.update(extra)
            stats["capacity"] = torch.tensor(float(cap))
        return RoutingPlan(idx, gate, valid, aux, T, stats)

    def _meter(self, idx_EX: torch.Tensor, valid_EX: torch.Tensor | None, tokens: int) -> None:
        """Eval forwards: record (slots run, slots used, tokens) when a `load_meter` is attached."""
        if self.load_meter is not None:
            used = idx_EX.numel() if valid_EX is None else valid_EX.sum()  # a tensor: no host sync
            self.load_meter.append((idx_EX.numel(), used, tokens))

    # ---- expert-choice thresholds and the capacity predictor ------------------------------------
    @torch.no_grad()
    def _track_threshold(self, cut_E: torch.Tensor) -> None:
        if _in_backward():  # activation-checkpoint recomputation: this step was already counted
            return
        w = torch.where(self.threshold_updates > 0, 1.0 - self.cfg.threshold_decay, 1.0)
        self.threshold_E.lerp_(cut_E.to(self.threshold_E.dtype), w)
        self.threshold_updates.add_(1)

    def _predictor_loss(self, pred_TE: torch.Tensor, idx_EX: torch.Tensor, valid_EX: torch.Tensor | None,
                        groups: int, cap: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted BCE of the predictor against "expert e took token t", and its selection accuracy:
        the fraction of each expert's predicted top-`cap` tokens (per local group) that the expert really
        took (chance: cap / G)."""
        T, E = pred_TE.shape
        taken_TE = torch.zeros_like(pred_TE)
        taken_TE[idx_EX.reshape(-1), torch.arange(E, device=idx_EX.device).repeat_interleave(idx_EX.shape[1])] = (
            1.0 if valid_EX is None else valid_EX.reshape(-1).to(pred_TE.dtype))
        bce = F.binary_cross_entropy_with_logits(pred_TE, taken_TE)
        with torch.no_grad():
            G = T // groups
            top_NEC = pred_TE.detach().view(groups, G, E).transpose(1, 2).topk(cap, dim=-1).indices
            taken_NEG = taken_TE.view(groups, G, E).transpose(1, 2)
            acc = taken_NEG.gather(-1, top_NEC).mean()
        return self.cfg.predictor_weight * bce, {"predictor_bce": bce.detach(), "predictor_acc": acc}

    def _dynamic(self, probs_TE: torch.Tensor, pred_TE: torch.Tensor | None, collect_stats: bool) -> RoutingPlan:
        """Batch-independent routing: expert-choice routers let each expert take the tokens whose score
        (predictor probability for diffmoe, else the affinity) reaches threshold * multiplier; token choice
        sends every token to its top-k experts without a capacity limit."""
        T, E = probs_TE.shape
        if self.cfg.router == "token_choice":
            top_p, top_e = probs_TE.topk(self.cfg.top_k, dim=-1)
            gate_TE = torch.zeros_like(probs_TE).scatter(1, top_e, top_p / top_p.sum(-1, keepdim=True))
            select_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, top_e, True)
        else:
            if not bool(self.threshold_updates > 0):
                raise RuntimeError("dynamic routing needs the expert thresholds learnt in training "
                                   "(Router.threshold_E was never updated); train first or use another mode")
            score_TE = probs_TE if pred_TE is None else pred_TE.sigmoid()
            select_TE = score_TE >= self.threshold_E.to(score_TE.dtype) * self.dynamic_multiplier
            gate_TE = probs_TE
        idx, gate, valid = selected_plan(select_TE, gate_TE)
        self._meter(idx, valid, T)
        stats = {}
        if collect_stats:
            stats = routing_stats(idx, valid, probs_TE.detach(), T)
            stats["capacity"] = valid.float().sum(1).mean()
        return RoutingPlan(idx, gate, valid, probs_TE.new_zeros(()), T, stats)

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        self.threshold_E.zero_()
        self.threshold_updates.zero_()


def _group_cutoff(score_TE: torch.Tensor, groups: int, cap: int) -> torch.Tensor:
    """[E] the cap-th best score of each expert in each group, averaged over the groups."""
    T, E = score_TE.shape
    return score_TE.view(groups, T // groups, E).topk(cap, dim=1).values[:, -1].mean(0)


__all__ = ["RoutingPlan", "Router", "CapacityPredictor", "LocalPool", "routing_groups", "expert_choice",
           "global_expert_choice", "selected_plan", "token_choice", "load_balancing_loss", "routing_stats"]
