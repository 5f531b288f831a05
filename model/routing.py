"""Routing of one MoE layer: expert choice (EC-DiT, Section 2.3), token choice top-A (GShard, the Table 4
baseline) and DiffMoE (expert choice over a batch-level token pool + a capacity predictor for dynamic
inference), in pieces with one job each:

  * selection, pure functions on [T, E] scores: `routing_groups`, `expert_choice`, `token_choice`,
    `global_expert_choice`, and for dynamic inference `threshold_choice`, `uncapped_token_choice`,
    `selected_plan`;
  * thresholds and predictor: `track_threshold_` (each expert's EMA of its training-time cut-off score),
    `CapacityPredictor` and `predictor_loss`;
  * statistics: `routing_stats` (logged per layer) and `LoadMeter` (expert work of eval forwards);
  * `Router`, which only wires them: W_r [E, D] on the router input x' (Eq. 4-5), then the selection of
    the mode at hand.

Every selection gives a `RoutingPlan` with static shapes: for every expert X slots, each naming a token
(index into the T flattened tokens of the local batch) and its combine weight. The dispatcher (moe.py, or
an expert-parallel one from parallel/) gathers the slots' tokens into [E, X, D], runs the experts, and
scatter-adds gate * output back to the tokens.

Routing groups: the T = B*S flattened tokens are cut into N contiguous groups of G tokens ("tokens":
G = group_size; "sample": G = S, one image; "batch": G = T). Each group is routed on its own: in expert
choice every expert takes exactly its top-Q tokens of every group (Q = capacity, X = N*Q).

Training mode routes by the config (`group`, `group_size`). Eval mode routes by the `InferenceRouting`
passed to the forward (default: the config's `inference_group`, `inference_group_size`,
`dynamic_multiplier`): a routing group as above ("tokens" = the paper's G tokens across the batch,
"sample" = capacity per image, "batch"), or "dynamic": each expert takes the tokens whose score passes its
threshold * multiplier, so a token's experts depend on that token only. The "dynamic" plan is padded to
the busiest expert's count (empty slots have gate 0); it needs a host sync and is meant for sampling,
not for the expert-parallel training path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import INFERENCE_MODES, MoEConfig


@dataclass
class RoutingPlan:
    """Static-shape token assignment for one MoE layer.

    idx_EX:   [E, X] token index in [0, T) of each expert slot (X = N * Q).
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


@dataclass(frozen=True)
class InferenceRouting:
    """Routing of eval-mode forwards, passed down DiT -> block -> MoE layer -> router.

    mode: one of INFERENCE_MODES; group_size: tokens per group in "tokens" mode (None: the config's);
    multiplier: threshold scale in "dynamic" mode (None: the config's; > 1 fewer tokens, < 1 more);
    meter: a `LoadMeter` recording the expert work of every forward (None: nothing recorded).
    """

    mode: str
    group_size: int | None = None
    multiplier: float | None = None
    meter: LoadMeter | None = None

    def __post_init__(self):
        if self.mode not in INFERENCE_MODES:
            raise ValueError(f"inference routing {self.mode!r} must be one of {INFERENCE_MODES}")


# ---- selection ------------------------------------------------------------------------------------

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
    gate_NEQ, pos_NEQ = a_NEG.topk(capacity, dim=-1, sorted=False)  # [N, E, Q]
    idx_NEQ = pos_NEQ + torch.arange(groups, device=pos_NEQ.device).view(groups, 1, 1) * G
    return idx_NEQ.permute(1, 0, 2).reshape(E, -1), gate_NEQ.permute(1, 0, 2).reshape(E, -1)


def token_choice(probs_TE: torch.Tensor, groups: int, top_k: int, capacity: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GShard top-k with a per-group capacity per expert.

    Each token picks its top-k experts; gates are the chosen probabilities renormalised to sum to 1.
    Slots are filled in priority order (all first choices of a group in token order, then all second
    choices, ...); an assignment beyond the expert's capacity is dropped. A token whose assignments
    are all dropped gets a zero MoE output and passes through the residual unchanged.

    Returns idx_EX, gate_EX, valid_EX ([E, groups*capacity]) and keep_TA ([T, A] bool, assignment kept).
    """
    T, E = probs_TE.shape
    G = T // groups
    top_p_TA, top_e_TA = probs_TE.topk(top_k, dim=-1)  # [T, A]
    gate_TA = top_p_TA / top_p_TA.sum(-1, keepdim=True)
    # Position of each assignment in its expert's queue, in priority order (choice rank, then token).
    e_NAG = top_e_TA.view(groups, G, top_k).transpose(1, 2)  # [N, A, G]
    onehot = F.one_hot(e_NAG.reshape(groups, top_k * G), E)  # [N, A*G, E]
    pos_NAG = ((onehot.cumsum(dim=1) - 1) * onehot).sum(-1).view(groups, top_k, G)
    keep_NAG = pos_NAG < capacity
    # Scatter kept assignments into [N, E*Q] slot tables; dropped ones go to a trash column.
    slot_NAG = torch.where(keep_NAG, e_NAG * capacity + pos_NAG, E * capacity)
    tok_NAG = (torch.arange(T, device=probs_TE.device).view(groups, 1, G)).expand(groups, top_k, G)
    gate_NAG = gate_TA.view(groups, G, top_k).transpose(1, 2)
    n_slots = E * capacity + 1
    base = torch.arange(groups, device=probs_TE.device).view(groups, 1) * G  # empty slots: group's 1st token
    idx = base.expand(groups, n_slots).clone().scatter_(1, slot_NAG.reshape(groups, -1), tok_NAG.reshape(groups, -1))
    gate = gate_TA.new_zeros(groups, n_slots).scatter(1, slot_NAG.reshape(groups, -1), gate_NAG.reshape(groups, -1))
    valid = torch.zeros(groups, n_slots, dtype=torch.bool, device=probs_TE.device)
    valid.scatter_(1, slot_NAG.reshape(groups, -1), True)

    def to_EX(table: torch.Tensor) -> torch.Tensor:  # [N, E*Q + 1] slot table, trash column last
        return table[:, :-1].reshape(groups, E, capacity).transpose(0, 1).reshape(E, groups * capacity)

    keep_TA = keep_NAG.transpose(1, 2).reshape(T, top_k)
    return to_EX(idx), to_EX(gate), to_EX(valid), keep_TA


def global_expert_choice(affinity_TE: torch.Tensor, pooled_TE: torch.Tensor, capacity: int, slots: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert choice over a pool larger than the local tokens (DiffMoE's global pool across ranks).

    affinity_TE: [T, E] local affinities (with gradient); pooled_TE: [T_pool, E] the affinities of the
    whole pool (the local ones included, no gradient). Each expert takes its top-`capacity` tokens of the
    pool; locally that is the tokens whose affinity reaches the expert's pool cut-off, of which at most
    `slots` (the static local shape) are kept. Returns idx_EX, gate_EX, valid_EX ([E, slots]) and the
    cut-off [E].
    """
    cutoff_E = pooled_TE.topk(capacity, dim=0).values[-1]  # [E] the Q-th best affinity of the pool
    gate_EX, idx_EX = affinity_TE.t().topk(slots, dim=1)  # [E, X] best local candidates
    valid_EX = gate_EX >= cutoff_E.unsqueeze(1)
    return idx_EX, gate_EX * valid_EX, valid_EX, cutoff_E


def group_cutoff(score_TE: torch.Tensor, groups: int, cap: int) -> torch.Tensor:
    """[E] the cap-th best score of each expert in each group, averaged over the groups."""
    T, E = score_TE.shape
    return score_TE.view(groups, T // groups, E).topk(cap, dim=1).values[:, -1].mean(0)


def threshold_choice(score_TE: torch.Tensor, threshold_E: torch.Tensor) -> torch.Tensor:
    """[T, E] bool: expert e takes the tokens whose score reaches its threshold (dynamic expert choice)."""
    return score_TE >= threshold_E.to(score_TE.dtype)


def uncapped_token_choice(probs_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token to its top-k experts, no capacity (dynamic token choice): select_TE [T, E] bool and
    gate_TE [T, E], the chosen probabilities renormalised to sum to 1 per token."""
    top_p_TA, top_e_TA = probs_TE.topk(top_k, dim=-1)
    gate_TE = torch.zeros_like(probs_TE).scatter(1, top_e_TA, top_p_TA / top_p_TA.sum(-1, keepdim=True))
    select_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, top_e_TA, True)
    return select_TE, gate_TE


def selected_plan(select_TE: torch.Tensor, gate_TE: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan of an arbitrary selection: expert e processes the tokens with select_TE[:, e] (dynamic
    inference). Padded to the busiest expert: idx_EX, gate_EX, valid_EX of shape [E, X], X = max count."""
    X = max(1, int(select_TE.sum(0).max()))
    sel_EX, idx_EX = select_TE.t().float().topk(X, dim=1)  # selected tokens first
    valid_EX = sel_EX > 0
    return idx_EX, gate_TE.t().gather(1, idx_EX) * valid_EX, valid_EX


def load_balancing_loss(probs_TE: torch.Tensor, top1_T: torch.Tensor, groups: int) -> torch.Tensor:
    """GShard / Switch auxiliary loss: E * sum_e (fraction of tokens whose first choice is e) *
    (mean router probability of e), averaged over groups; 1.0 when perfectly uniform."""
    T, E = probs_TE.shape
    G = T // groups
    frac_NE = F.one_hot(top1_T.view(groups, G), E).float().mean(1)  # [N, E], no gradient
    mean_p_NE = probs_TE.view(groups, G, E).mean(1)  # [N, E]
    return E * (frac_NE * mean_p_NE).sum(-1).mean()


# ---- thresholds and the capacity predictor ----------------------------------------------------------

def _in_backward() -> bool:
    """True while autograd runs a backward (e.g. activation-checkpoint recomputation of a forward).

    Under torch.compile the forward is traced once and its side effects (the threshold update) run
    once per call; activation checkpointing compiled with the block (parallel/compile.py compiles the
    checkpointed block) recomputes inside the compiled backward without replaying them."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


@torch.no_grad()
def track_threshold_(threshold_E: torch.Tensor, updates: torch.Tensor, cut_E: torch.Tensor, decay: float) -> None:
    """In place: threshold_E <- EMA (decay `decay`) of the cut-off scores cut_E, the first one taken as is;
    `updates` counts them. Skipped during an activation-checkpoint recomputation (already counted)."""
    if _in_backward():
        return
    w = torch.where(updates > 0, 1.0 - decay, 1.0)
    threshold_E.lerp_(cut_E.to(threshold_E.dtype), w)
    updates.add_(1)


class CapacityPredictor(nn.Module):
    """DiffMoE's capacity predictor: MLP D -> hidden -> E on the detached router input, the logit of
    "expert e takes this token". Trained with BCE against the training-time expert choice
    (`predictor_loss`); it never sends a gradient into the network."""

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


def predictor_loss(pred_TE: torch.Tensor, idx_EX: torch.Tensor, valid_EX: torch.Tensor | None, groups: int,
                   cap: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE of the predictor logits against "expert e took token t" (unweighted), and its selection
    accuracy: the fraction of each expert's predicted top-`cap` tokens (per local group) that the expert
    really took (chance: cap / G)."""
    T, E = pred_TE.shape
    taken_TE = torch.zeros_like(pred_TE)
    taken_TE[idx_EX.reshape(-1), torch.arange(E, device=idx_EX.device).repeat_interleave(idx_EX.shape[1])] = (
        1.0 if valid_EX is None else valid_EX.reshape(-1).to(pred_TE.dtype))
    bce = F.binary_cross_entropy_with_logits(pred_TE, taken_TE)
    with torch.no_grad():
        G = T // groups
        top_NEQ = pred_TE.detach().view(groups, G, E).transpose(1, 2).topk(cap, dim=-1).indices
        taken_NEG = taken_TE.view(groups, G, E).transpose(1, 2)
        acc = taken_NEG.gather(-1, top_NEQ).mean()
    return bce, {"predictor_bce": bce.detach(), "predictor_acc": acc}


# ---- statistics -------------------------------------------------------------------------------------

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


class LoadMeter:
    """Expert work of eval forwards, per MoE layer: slots run (incl. the padding of dynamic plans and
    token choice's empty slots), slots used and tokens, summed over the recorded plans."""

    def __init__(self, layers: int):
        self.records: list[list[tuple[int, int | torch.Tensor, int]]] = [[] for _ in range(layers)]

    def record(self, layer: int, plan: RoutingPlan) -> None:
        used = plan.idx_EX.numel() if plan.valid_EX is None else plan.valid_EX.sum()  # a tensor: no host sync
        self.records[layer].append((plan.idx_EX.numel(), used, plan.num_tokens))

    def summary(self) -> dict[str, list[float]]:
        """Per layer experts_per_token (slots used / tokens; the useful compute) and slots_run_per_token
        (slots computed / tokens); {} without layers."""
        result: dict[str, list[float]] = {}
        for rec in self.records:
            run, used, tokens = (float(sum(v)) for v in zip(*rec)) if rec else (0, 0, 0)
            result.setdefault("experts_per_token", []).append(used / max(1, tokens))
            result.setdefault("slots_run_per_token", []).append(run / max(1, tokens))
        return result


# ---- the router ---------------------------------------------------------------------------------------

class LocalPool:
    """The routing pool of one process (default). parallel/ installs a pool spanning the data-parallel
    ranks: `gather` all-gathers [T, E] scores (no gradient), `mean` all-reduces the cut-offs."""

    world = 1

    def gather(self, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class _Selection:
    """A router's choice before statistics: the plan's slots, its aux loss, extra statistics and the
    capacity to log (None: the mean count of valid slots per expert)."""

    idx_EX: torch.Tensor
    gate_EX: torch.Tensor
    valid_EX: torch.Tensor | None
    aux_loss: torch.Tensor
    capacity: int | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Router of one MoE layer: W_r [E, D] on the router input x' (Eq. 4-5), then expert or token choice.

    Expert-choice routers keep `threshold_E` [E], the EMA of the training-time cut-off scores, for
    "dynamic" inference; diffmoe adds the capacity predictor, whose weighted BCE is the plan's aux_loss.
    `pool` is the seam through which parallel/ widens DiffMoE's token pool and the threshold cut-offs to
    the data-parallel ranks (see LocalPool).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))  # [E, D]
        self.predictor = (CapacityPredictor(dim, cfg.predictor_hidden or dim, cfg.num_experts)
                          if cfg.router == "diffmoe" else None)
        self.register_buffer("threshold_E", torch.empty(cfg.num_experts))
        self.register_buffer("threshold_updates", torch.empty(()))
        self.pool = LocalPool()

    def inference(self, routing: InferenceRouting | None) -> tuple[str, int, float]:
        """(mode, group size, multiplier) of eval-mode routing: `routing`'s, the config's where None."""
        cfg = self.cfg
        if routing is None:
            return cfg.inference_group, cfg.inference_group_size, cfg.dynamic_multiplier
        return (routing.mode, cfg.inference_group_size if routing.group_size is None else routing.group_size,
                cfg.dynamic_multiplier if routing.multiplier is None else routing.multiplier)

    def group_for(self, batch: int, seq: int, routing: InferenceRouting | None = None) -> tuple[int, int]:
        """(N groups, G tokens per group): the config's training group, or in eval mode `routing`'s."""
        if self.training:
            return routing_groups(batch, seq, self.cfg.group, self.cfg.group_size)
        mode, size, _ = self.inference(routing)
        return routing_groups(batch, seq, mode, size)

    def scores(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Affinities probs_TE (softmax of x W_r^T, Eq. 5) and the predictor logits pred_TE (diffmoe, else
        None), in at least fp32: they decide discrete choices, keep them stable under bf16."""
        B, S, D = x_BSD.shape
        dt = torch.promote_types(x_BSD.dtype, torch.float32)
        with torch.autocast(x_BSD.device.type, enabled=False):
            x_TD = x_BSD.reshape(B * S, D).to(dt)
            logits_TE = F.linear(x_TD, self.weight.to(dt))
            pred_TE = None if self.predictor is None else self.predictor(x_TD.detach())
        return logits_TE.softmax(dim=-1), pred_TE

    def forward(self, x_BSD: torch.Tensor, routing: InferenceRouting | None = None,
                collect_stats: bool = True) -> RoutingPlan:
        """Plan of the tokens x_BSD [B, S, D]; `routing` applies in eval mode only (None: the config's)."""
        B, S, _ = x_BSD.shape
        probs_TE, pred_TE = self.scores(x_BSD)
        mode, _, multiplier = self.inference(routing)
        if not self.training and mode == "dynamic":
            sel = self._dynamic(probs_TE, pred_TE, multiplier)
        else:
            groups, G = self.group_for(B, S, routing)
            if self.cfg.router == "token_choice":
                sel = self._token_choice(probs_TE, groups, G)
            elif self.training:
                sel = self._expert_choice_train(probs_TE, pred_TE, groups, G)
            else:
                cap = self.cfg.capacity(G)
                sel = _Selection(*expert_choice(probs_TE, groups, cap), None, probs_TE.new_zeros(()), cap)
        stats = self._stats(sel, probs_TE) if collect_stats else {}
        return RoutingPlan(sel.idx_EX, sel.gate_EX, sel.valid_EX, sel.aux_loss, probs_TE.shape[0], stats)

    def _token_choice(self, probs_TE: torch.Tensor, groups: int, G: int) -> _Selection:
        cap = self.cfg.capacity(G)
        idx, gate, valid, keep_TA = token_choice(probs_TE, groups, self.cfg.top_k, cap)
        aux = self.cfg.aux_loss_weight * load_balancing_loss(probs_TE, probs_TE.argmax(-1), groups)
        extra = {"drop_rate": 1.0 - keep_TA.float().mean().detach(), "aux_loss": aux.detach()}
        return _Selection(idx, gate, valid, aux, cap, extra)

    def _expert_choice_train(self, probs_TE: torch.Tensor, pred_TE: torch.Tensor | None, groups: int,
                             G: int) -> _Selection:
        """Expert choice in training: also tracks the thresholds and, for diffmoe, the predictor loss."""
        cfg = self.cfg
        cap = cfg.capacity(G)
        # Score whose training-time cut-off each expert's threshold tracks (dynamic inference).
        score_TE = probs_TE.detach() if pred_TE is None else pred_TE.detach().sigmoid()
        extra: dict[str, torch.Tensor] = {}
        if cfg.global_pool and self.pool.world > 1:
            idx, gate, valid, score_cut_E, cap, extra["pool_overflow"] = self._pooled_choice(probs_TE, score_TE)
        else:
            idx, gate = expert_choice(probs_TE, groups, cap)
            valid = None
            # EC: the chosen gates are the top-Q affinities, so their group minimum is the cut-off.
            cut_E = (gate.detach().view(-1, groups, cap).amin(-1).mean(-1) if pred_TE is None
                     else group_cutoff(score_TE, groups, cap))
            score_cut_E = self.pool.mean(cut_E)
        track_threshold_(self.threshold_E, self.threshold_updates, score_cut_E, cfg.threshold_decay)
        extra["threshold_mean"] = self.threshold_E.mean()
        aux = probs_TE.new_zeros(())
        if pred_TE is not None:
            bce, extra_pred = predictor_loss(pred_TE, idx, valid, groups, cfg.capacity(G))
            aux = cfg.predictor_weight * bce
            extra.update(extra_pred)
        return _Selection(idx, gate, valid, aux, cap, extra)

    def _pooled_choice(self, probs_TE: torch.Tensor, score_TE: torch.Tensor) -> tuple:
        """DiffMoE's global pool: expert choice over the scores of all ranks of `pool`. Returns idx_EX,
        gate_EX, valid_EX, the pool's score cut-off [E], the pool capacity and the overflow fraction (local
        tokens past the cut-off beyond the static slots)."""
        cfg, T, E = self.cfg, probs_TE.shape[0], self.cfg.num_experts
        pooled = self.pool.gather(torch.cat([probs_TE.detach(), score_TE], dim=1))  # [world * T, 2E]
        cap = cfg.capacity(pooled.shape[0])
        slots = min(T, math.ceil(cfg.pool_slack * cfg.capacity(T)))
        idx, gate, valid, cut_E = global_expert_choice(probs_TE, pooled[:, :E], cap, slots)
        overflow = 1.0 - valid.sum() / (probs_TE.detach() >= cut_E).sum().clamp_min(1)
        score_cut_E = pooled[:, E:].topk(cap, dim=0).values[-1]
        return idx, gate, valid, score_cut_E, cap, overflow

    def _dynamic(self, probs_TE: torch.Tensor, pred_TE: torch.Tensor | None, multiplier: float) -> _Selection:
        """Batch-independent routing: expert-choice routers let each expert take the tokens whose score
        (predictor probability for diffmoe, else the affinity) reaches threshold * multiplier; token choice
        sends every token to its top-k experts without a capacity limit."""
        if self.cfg.router == "token_choice":
            select_TE, gate_TE = uncapped_token_choice(probs_TE, self.cfg.top_k)
        else:
            if not bool(self.threshold_updates > 0):
                raise RuntimeError("dynamic routing needs the expert thresholds learnt in training "
                                   "(Router.threshold_E was never updated); train first or use another mode")
            score_TE = probs_TE if pred_TE is None else pred_TE.sigmoid()
            select_TE = threshold_choice(score_TE, self.threshold_E.to(score_TE.dtype) * multiplier)
            gate_TE = probs_TE
        return _Selection(*selected_plan(select_TE, gate_TE), probs_TE.new_zeros(()), None)

    @staticmethod
    def _stats(sel: _Selection, probs_TE: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = routing_stats(sel.idx_EX, sel.valid_EX, probs_TE.detach(), probs_TE.shape[0])
        stats.update(sel.extra)
        stats["capacity"] = (torch.tensor(float(sel.capacity)) if sel.capacity is not None
                             else sel.valid_EX.float().sum(1).mean())
        return stats

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        self.threshold_E.zero_()
        self.threshold_updates.zero_()


__all__ = ["RoutingPlan", "InferenceRouting", "Router", "CapacityPredictor", "LocalPool", "LoadMeter",
           "routing_groups", "expert_choice", "global_expert_choice", "token_choice", "group_cutoff",
           "threshold_choice", "uncapped_token_choice", "selected_plan", "load_balancing_loss",
           "predictor_loss", "track_threshold_", "routing_stats"]
