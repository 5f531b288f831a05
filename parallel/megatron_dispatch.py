"""Expert parallelism, path 1: megatron-core's token dispatchers fed with OUR routing plan.

`MegatronDispatcher(mesh, kind)` plugs into `apply_expert_parallel` like the plain all-to-all path:

    apply_expert_parallel(model, mesh, make_dispatcher=lambda m: MegatronDispatcher(m, "alltoall"))

Per MoE layer and step:
  1. the plan (idx_EX, gate_EX, valid_EX) becomes megatron's routing_map [T, E] bool and probs [T, E]
     (expert choice: a token goes to 0..E experts; token choice: dropped assignments are absent);
  2. megatron's `dispatch_preprocess -> token_dispatch -> dispatch_postprocess` returns this rank's
     tokens sorted by local expert, tokens_per_expert and the permuted probs;
  3. our `GroupedExperts` run as ONE batched matmul over [E_local, ep * X, D]: expert choice gives every
     local expert exactly ep * X tokens (a reshape); token choice gives uneven counts bounded by
     the capacity ep * X, so the rows are scattered into a zero-padded [E_local, ep * X, D] buffer
     (static shape, no Python loop over experts) and gathered back after the experts;
  4. the caller applies the gates (megatron hands back permuted probs), then
     `combine_preprocess -> token_combine -> combine_postprocess` gives [T, D].

kind="alltoall" uses `MoEAlltoAllTokenDispatcher` (split sizes exchanged every step: uneven
all-to-all-v); kind="allgather" uses `MoEAllGatherTokenDispatcher` (every rank gathers all tokens of
the group, keeps those of its experts, and the outputs go back by reduce-scatter).

Assumption: a token occupies at most one slot per expert (true for both of our routers); the routing
map cannot express duplicates.

Importing megatron's dispatcher module takes ~5 s, so megatron is imported lazily, at the first
construction of a dispatcher. On a machine without CUDA, `install_cpu_shim()` patches the three spots
that assume a GPU; on GPU nothing is patched.

Versions (pyproject's `megatron` extra): 0.16.1 on Python 3.11, the newest there; 0.19.x on Python
3.12+. What this file uses is the same in both: the dispatcher constructors and their six dispatch /
combine methods, `ProcessGroupCollection(ep=, tp_ep=, expt_tp=)`, the `TransformerConfig` fields below,
`parallel_state`'s expert-parallel calls, and the shim's patch points (`_require_patch_points` checks
them). One behaviour changed: 0.19's unfused permutation keeps the first `num_out_tokens` entries of
the routing map where 0.16 kept all of them, so `num_out_tokens` must be the map's count, which is
what `moe_expert_capacity_factor` makes it (`megatron_config`). tests/parallel/test_megatron_dispatch.py
passes with 0.16.1 and with 0.19.2 (the latter on Python 3.11, its source on PYTHONPATH, its one
triton-only module stubbed). `import megatron.core` 0.19 needs triton, which CUDA builds of torch bring.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from model.extras import require
from model.moe import GroupedExperts, LocalDispatcher
from model.routing import RoutingPlan

KINDS = ("alltoall", "allgather")

_SHIM_INSTALLED = False


def install_cpu_shim() -> bool:
    """Make megatron-core's token dispatchers (0.16.1, 0.19) run on CPU/gloo. Returns True if installed.

    Does nothing when CUDA is available: on GPU megatron runs unpatched. On CPU three spots assume a GPU:
      - `torch.cuda.current_device()` allocates communication buffers (tensor_parallel/mappings.py,
        the global memory buffer): patched to return the CPU device (a CPU-only torch raises there);
      - `MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`, a class attribute created as `torch.cuda.Stream()`
        in __init__: set to a placeholder so none is created;
      - `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize` copies split sizes device-to-host on
        that stream: replaced by plain `.tolist()` conversions at the same point.
    Idempotent; process-wide (it patches torch.cuda.current_device, which raises anyway without CUDA).
    """
    global _SHIM_INSTALLED
    if torch.cuda.is_available():
        return False
    if _SHIM_INSTALLED:
        return True
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as A2A

    _require_patch_points(A2A)
    torch.cuda.current_device = lambda: torch.device("cpu")
    A2A.cuda_dtoh_stream = object()  # never used: the method below replaces its only user

    def _dtoh_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            as_list = lambda t: t.tolist() if torch.is_tensor(t) else t  # noqa: E731
            self.input_splits = as_list(self.input_splits)
            self.output_splits = as_list(self.output_splits)
            self.output_splits_tp = as_list(self.output_splits_tp)
        return tokens_per_expert

    A2A._maybe_dtoh_and_synchronize = _dtoh_cpu
    _SHIM_INSTALLED = True
    return True


def megatron_version() -> str:
    """The installed megatron-core's version."""
    from importlib.metadata import version
    return version("megatron-core")


def _require_patch_points(a2a: type) -> None:
    """Raise RuntimeError unless the all-to-all dispatcher has what `install_cpu_shim` patches and reads:
    the class attribute `cuda_dtoh_stream`, `_maybe_dtoh_and_synchronize(point, tokens_per_expert)`, and
    the attributes that method converts (assigned in the source of the class or its bases)."""
    import inspect

    source = ""
    for cls in a2a.__mro__[:-1]:
        try:
            source += inspect.getsource(cls)
        except (OSError, TypeError):
            pass
    method = getattr(a2a, "_maybe_dtoh_and_synchronize", None)
    params = list(inspect.signature(method).parameters)[:3] if callable(method) else []
    missing = [] if hasattr(a2a, "cuda_dtoh_stream") else ["cuda_dtoh_stream"]
    if params != ["self", "point", "tokens_per_expert"]:
        missing.append("_maybe_dtoh_and_synchronize(point, tokens_per_expert)")
    missing += [name for name in ("drop_and_pad", "cuda_dtoh_point", "input_splits", "output_splits",
                                  "output_splits_tp") if f"self.{name} =" not in source]
    if missing:
        raise RuntimeError(f"megatron-core {megatron_version()}: the CPU shim's patch points "
                           f"{', '.join(missing)} are gone (known: 0.16.1, 0.19); run it on a GPU")


def init_parallel_state(mesh: DeviceMesh) -> None:
    """Initialise megatron-core's `parallel_state` to agree with our 1-D expert-parallel `mesh`
    (`initialize_model_parallel(expert_model_parallel_size=ep)`, TP = PP = 1), or check that an
    existing initialisation agrees. Raises ValueError if megatron's expert group is not the mesh's."""
    if mesh.ndim != 1:
        raise ValueError(f"expert-parallel mesh must be 1-D, got dims {mesh.mesh_dim_names}")
    from megatron.core import parallel_state as ps

    ep = mesh.size()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(expert_model_parallel_size=ep)
    have = ps.get_expert_model_parallel_world_size()
    if have != ep:
        raise ValueError(f"megatron parallel_state has expert_model_parallel_size={have}, but the "
                         f"expert-parallel mesh has size {ep}")
    theirs = torch.distributed.get_process_group_ranks(ps.get_expert_model_parallel_group())
    ours = torch.distributed.get_process_group_ranks(mesh.get_group())
    if theirs != ours:
        raise ValueError(f"megatron's expert-parallel group has ranks {theirs}, the mesh {ours}: "
                         "build the mesh with the expert dim innermost (contiguous ranks)")


def megatron_config(num_experts: int, dim: int, hidden: int, ep: int, kind: str, top_k: int = 2,
                    dtype: torch.dtype = torch.float32):
    """The `TransformerConfig` the dispatchers read (no megatron module is built from it).

    `moe_expert_capacity_factor` is set so that megatron sizes its permutation from the routing map
    (otherwise it assumes tokens * topk outputs, wrong for expert choice: the fused GPU permute, and from
    0.19 the unfused one too, would keep that many entries of the map);
    `moe_pad_expert_input_to_capacity` stays off (it would drop/pad by megatron's own capacity).
    Fused permutation needs Transformer Engine: on only when CUDA is available.
    """
    if kind not in KINDS:
        raise ValueError(f"megatron dispatcher kind={kind!r} must be one of {KINDS}")
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=dim, num_attention_heads=1, ffn_hidden_size=hidden,
        num_moe_experts=num_experts, moe_ffn_hidden_size=hidden, expert_model_parallel_size=ep,
        moe_token_dispatcher_type=kind, moe_router_topk=max(1, top_k), moe_router_pre_softmax=True,
        moe_expert_capacity_factor=float(num_experts), moe_router_load_balancing_type="none",
        moe_permute_fusion=torch.cuda.is_available() and _has_te(), add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=dtype)


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def routing_map_from_plan(plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map [T, E] bool, probs [T, E]) of a plan; probs carries the gates (differentiable)."""
    E, X = plan.idx_EX.shape
    T = plan.num_tokens
    e_EX = torch.arange(E, device=plan.idx_EX.device).view(E, 1).expand(E, X)
    valid_EX = torch.ones_like(plan.idx_EX, dtype=torch.bool) if plan.valid_EX is None else plan.valid_EX
    gate_EX = plan.gate_EX if plan.valid_EX is None else plan.gate_EX * plan.valid_EX
    flat = (plan.idx_EX * E + e_EX).reshape(-1)  # position in the flattened [T, E]
    # Empty slots (valid False) point at some token; put them in a trash column so they change nothing.
    flat = torch.where(valid_EX.reshape(-1), flat, T * E)
    map_TE = torch.zeros(T * E + 1, dtype=torch.bool, device=flat.device).index_fill_(0, flat, True)
    probs_TE = gate_EX.new_zeros(T * E + 1).index_put((flat,), gate_EX.reshape(-1))
    return map_TE[:-1].view(T, E), probs_TE[:-1].view(T, E)


class MegatronDispatcher(LocalDispatcher):
    """Expert-parallel dispatch through megatron-core's all-to-all or all-gather token dispatcher.

    One instance per MoE layer (the megatron dispatcher keeps per-step state between dispatch and
    combine). The megatron object is built at the first call, when E, D and F are known.
    """

    def __init__(self, mesh: DeviceMesh, kind: str = "alltoall"):
        if kind not in KINDS:
            raise ValueError(f"megatron dispatcher kind={kind!r} must be one of {KINDS}")
        if mesh.ndim != 1:
            raise ValueError(f"expert-parallel mesh must be 1-D, got dims {mesh.mesh_dim_names}")
        require("megatron", f"parallel.dispatcher=megatron_{kind}")
        self.mesh, self.kind, self.size = mesh, kind, mesh.size()
        self.rank = mesh.get_local_rank()
        install_cpu_shim()
        init_parallel_state(mesh)
        self._impl = None
        self._key = None

    def _dispatcher(self, experts: GroupedExperts, dim: int, dtype: torch.dtype, top_k: int):
        key = (experts.num_experts, dim, experts.hidden, dtype)
        if self._impl is None or key != self._key:
            from megatron.core.process_groups_config import ProcessGroupCollection
            from megatron.core.transformer.moe import token_dispatcher as td

            E = experts.num_experts
            if E % self.size:
                raise ValueError(f"model.moe.num_experts={E} must be divisible by the expert-parallel "
                                 f"size {self.size}")
            local = E // self.size
            cfg = megatron_config(E, dim, experts.hidden, self.size, self.kind, top_k, dtype)
            group = self.mesh.get_group()
            pgs = ProcessGroupCollection(ep=group, tp_ep=group, expt_tp=None)
            cls = td.MoEAlltoAllTokenDispatcher if self.kind == "alltoall" else td.MoEAllGatherTokenDispatcher
            self._impl = cls(local, list(range(self.rank * local, (self.rank + 1) * local)), cfg, pgs)
            self._key = key
        return self._impl

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> torch.Tensor:
        E, X = plan.idx_EX.shape
        T, D = x_TD.shape
        ep = self.size
        local = E // ep
        disp = self._dispatcher(experts, D, x_TD.dtype, top_k=max(1, round(E * X / max(T, 1))))
        map_TE, probs_TE = routing_map_from_plan(plan)
        h, p = disp.dispatch_preprocess(x_TD, map_TE, probs_TE.to(x_TD.dtype))
        h, p = disp.token_dispatch(h, p)
        h_RD, tokens_per_expert, p_R = disp.dispatch_postprocess(h, p)  # R rows sorted by local expert
        cap = ep * X  # most tokens a local expert can receive: X slots from each of the ep ranks
        if plan.valid_EX is None:  # expert choice: exactly cap tokens per local expert
            y_RD = experts(h_RD.view(local, cap, D)).view(-1, D)
        else:  # token choice: uneven counts <= cap; zero-padded [local, cap, D], one batched matmul
            counts = torch.as_tensor(tokens_per_expert, device="cpu").long()
            start = torch.cumsum(counts, 0) - counts
            e_R = torch.repeat_interleave(torch.arange(local), counts)
            row_R = (e_R * cap + torch.arange(int(counts.sum())) - start[e_R]).to(x_TD.device)
            buf = h_RD.new_zeros(local * cap, D).index_copy(0, row_R, h_RD)
            y_RD = experts(buf.view(local, cap, D)).view(local * cap, D).index_select(0, row_R)
        y_RD = y_RD * p_R.to(y_RD.dtype).unsqueeze(-1)  # megatron leaves the gates to the caller
        out = disp.combine_preprocess(y_RD)
        out = disp.token_combine(out)
        return disp.combine_postprocess(out).view(T, D)


__all__ = ["MegatronDispatcher", "install_cpu_shim", "init_parallel_state", "megatron_config",
           "megatron_version", "routing_map_from_plan", "KINDS"]
