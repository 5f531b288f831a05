"""DeepSpeed ZeRO (stage 2 / 3): the alternative training engine for the same DiT model.

    config = ds_config(stage=2, micro_batch=4, lr=1e-4, bf16=True, grad_clip=1.0)
    apply_expert_parallel_zero(model, mesh["ep"])            # optional: parallel.ep > 1 (ZeRO-2)
    engine = build_engine(model, config, lr_scheduler=...)
    loss = flow_loss(engine, x0_BCHW, ctx_BLT, ctx_mask_BL, FlowConfig(), generator=g)["loss"]
    finite = micro_step(engine, loss)                        # the trainer's and the tests' one step

Runs under `torchrun` / `deepspeed` / `mp.spawn` (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The
`deepspeed` launcher appends `--local_rank=N` to the script's arguments: strip it before parsing.

CPU (DeepSpeed 0.19.8 installed with DS_BUILD_OPS=0): DeepSpeed picks its CPU accelerator by itself
(gloo). Verified here: ZeRO-2 and ZeRO-3 in fp32 on 2 processes, ZeRO-2 with expert parallelism on 2
and 4 processes (tests/parallel/test_deepspeed.py) and bf16 (single-process smoke run), with
`"torch_adam": true` (torch's AdamW; without it DeepSpeed JIT-compiles its CPU Adam at start-up, ~1 min).
Not tried here (they need a GPU or compiled ops): fp16 with loss scaling, the fused CUDA optimizers,
ZeRO-Offload with DeepSpeed's compiled CPU Adam, NVMe offload (async I/O op).

Expert parallelism under ZeRO-2 (`apply_expert_parallel_zero`): each rank keeps its E / ep experts as
plain parameters (DeepSpeed cannot take DTensors) and our dispatchers (parallel/expert_parallel.py,
parallel/megatron_dispatch.py) move the tokens. DeepSpeed's MoE conventions do the rest: the expert and
expert-data-parallel groups of `deepspeed.utils.groups` (ep innermost, as parallel/mesh.py), expert
parameters marked `allreduce=False` with their `group_name`, and a parameter-less
`deepspeed.moe.layer.MoE` declaration (`ExpertParallelDeclaration`) on the model, which is what DeepSpeed
keys its MoE handling on: optimizer groups split by `split_params_into_different_moe_groups_for_optimizer`,
the initial broadcast of experts within their expert-data-parallel group only (not rank 0's experts
everywhere), ZeRO partitions and gradient reduction of the experts over that group, and the global
gradient norm over both. DeepSpeed divides every reduced gradient by the whole data-parallel size, and an
expert's local gradient already sums the tokens of its expert-parallel group: that is the gradient of the
global mean loss, so the 1/ep hooks of the FSDP path are not installed here.
ZeRO-3 with expert parallelism is refused (`ZERO3_EP_REASON`).

EMA (`ema_params`): ZeRO-2 follows the module's parameters (each rank holds them whole, and its own
experts); ZeRO-3 follows each rank's own fp32 master partition of every parameter
(`safe_get_local_fp32_param`, without the padding): ZeRO-3 flattens each parameter, pads it to a multiple
of the data-parallel size and gives rank r the r-th of the equal pieces (`partition_layout`).

Checkpoints (`save` / `load`): DeepSpeed's files, whose module file holds rank 0's experts only, plus
`weights/`: every expert-parallel rank's experts (`experts_ep<r>.pt`, written by that rank's first
expert-data-parallel replica) and the EMA: under ZeRO-2 `ema.pt` (the non-expert parameters; the
experts' EMA in the expert files), under ZeRO-3 one `ema_rank<r>.pt` per rank (its partitions, each with
its layout: full shape, numel and offset in the flat parameter, so assembly needs no DeepSpeed).
`full_state_dict` assembles the unsharded model (raw or EMA) for inference.

Resharding. A ZeRO checkpoint saved at one data-parallel size does not load at another by itself.
Two routes, both here (without expert parallelism):
  - `to_universal(ckpt_dir, out_dir)` runs DeepSpeed's `ds_to_universal` conversion (fp32 weights and
    optimizer moments per parameter); an engine built with `ds_config(..., load_universal=True)` then
    `engine.load_checkpoint(out_dir, tag)` continues training at any DP size, optimizer included.
  - `load_fp32_weights(model, ckpt_dir)`: full weights into a plain model (`full_state_dict`; fp32 from
    `get_fp32_state_dict_from_zero_checkpoint` without experts): for export / evaluation (optimizer state
    is not restored).
DeepSpeed reads its checkpoints with `torch.load(weights_only=False)`: only load checkpoints you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from model.extras import require
from model.dit import DiT
from model.moe import LocalDispatcher

from .expert_parallel import AllToAllDispatcher, keep_local_experts
from .mesh import ZERO3_EP_REASON

require("deepspeed", "parallel.engine=deepspeed")
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.moe.utils import is_moe_param  # noqa: E402

STAGES = (2, 3)
WEIGHTS_DIR, EMA_FILE, EXPERT_FILE = "weights", "ema.pt", "experts_ep{:03d}.pt"
EMA_RANK_FILE, EMA_RANK_GLOB = "ema_rank{:05d}.pt", "ema_rank*.pt"  # ZeRO-3: one file per rank
MODULE_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module state (data-parallel rank 0)
DECLARATION = "deepspeed_expert_parallel"  # the model's child that declares the experts to DeepSpeed


def ds_config(stage: int = 2, micro_batch: int = 1, grad_accum: int = 1, lr: float = 1e-4,
              bf16: bool = False, grad_clip: float | None = 1.0, weight_decay: float = 0.0,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              load_universal: bool = False) -> dict:
    """DeepSpeed JSON config (as a dict) from plain arguments. The global batch is
    micro_batch * grad_accum * data-parallel size (DeepSpeed derives it)."""
    if stage not in STAGES:
        raise ValueError(f"deepspeed stage={stage} must be one of {STAGES}")
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"deepspeed {name}={value!r} must be an integer >= 1")
    if not lr > 0:
        raise ValueError(f"deepspeed lr={lr} must be > 0")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"deepspeed grad_clip={grad_clip} must be > 0 (or None for no clipping)")
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if grad_clip is None else float(grad_clip),
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
            "torch_adam": True}},  # torch's AdamW: no JIT build of DeepSpeed's CPU Adam
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": bool(load_universal)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class ExpertParallelDeclaration(MoE):
    """A parameter-less `deepspeed.moe.layer.MoE`: its presence tells `deepspeed.initialize` that the model
    has expert parameters (those with `allreduce=False`; their `group_name` names DeepSpeed's expert groups,
    created by `apply_expert_parallel_zero`). It owns no experts (`num_local_experts = 0`): DeepSpeed
    writes no per-expert files, `save` writes the stacked experts itself. Never called."""

    def __init__(self, num_experts: int, ep: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size, self.num_local_experts = num_experts, ep, 0
        self.expert_group_name = expert_group_name(ep)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        pass  # the groups exist already

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertParallelDeclaration only declares expert parameters to DeepSpeed")


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert(-data)-parallel groups of size `ep` (deepspeed.utils.groups)."""
    return f"ep_size_{ep}"


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters DeepSpeed treats as expert parameters (`allreduce=False`), by name."""
    return {n: p for n, p in model.named_parameters() if is_moe_param(p)}


def apply_expert_parallel_zero(model: DiT, mesh: DeviceMesh, zero_stage: int = 2,
                               make_dispatcher: Callable[[DeviceMesh], LocalDispatcher] = AllToAllDispatcher) -> DiT:
    """Expert parallelism for DeepSpeed ZeRO-2 over the 1-D expert-parallel `mesh` (parallel/mesh.py's
    "ep" dim): DeepSpeed's expert and expert-data-parallel groups (the same ranks), every MoE layer keeps
    its rank's experts as plain parameters marked for DeepSpeed and gets `make_dispatcher(mesh)`, and the
    model gets the `ExpertParallelDeclaration`. Expects the same full weights on every rank; call before
    `build_engine`."""
    import deepspeed
    from deepspeed.utils import groups

    ep = mesh.size()
    if zero_stage == 3:
        raise ValueError(f"parallel.ep={ep} with parallel.zero_stage=3: {ZERO3_EP_REASON}")
    deepspeed.init_distributed()
    name = expert_group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    ds_ranks = dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
    if ds_ranks != mesh.mesh.flatten().tolist():
        raise RuntimeError(f"DeepSpeed's expert-parallel group {ds_ranks} is not the mesh's {mesh.mesh.tolist()}")
    num_experts = 0
    for blk in model.blocks:
        if blk.is_moe:
            num_experts = blk.ffn.experts.num_experts
            keep_local_experts(blk.ffn.experts, mesh)
            for p in blk.ffn.experts.parameters():
                p.allreduce, p.group_name = False, name
            blk.ffn.dispatcher = make_dispatcher(mesh)
    model.add_module(DECLARATION, ExpertParallelDeclaration(num_experts, ep))
    return model


def build_engine(model: nn.Module, config: dict, lr_scheduler=None):
    """`deepspeed.initialize` for `model` (weights already initialised, identical on every rank:
    DeepSpeed broadcasts rank 0's anyway, and each expert's from its first replica). Initialises
    torch.distributed if needed (gloo on CPU).

    Under ZeRO-3 every `MoEFeedForward` becomes a ZeRO-3 "leaf" module (its router and experts are
    gathered together for its forward and backward): the router returns a `RoutingPlan` dataclass,
    which ZeRO-3's module hooks do not look into, so without this the router weight is not re-gathered
    for backward ("The size of tensor a (0) must match the size of tensor b (D)").
    `lr_scheduler`: a torch scheduler or a callable optimizer -> scheduler (deepspeed.initialize's)."""
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed()
    if config.get("zero_optimization", {}).get("stage") == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from model.moe import MoEFeedForward
        if any(isinstance(m, MoEFeedForward) for m in model.modules()):
            set_z3_leaf_modules(model, [MoEFeedForward])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=config,
                                           lr_scheduler=lr_scheduler)
    return engine


def micro_step(engine, loss: torch.Tensor) -> torch.Tensor:
    """One micro-batch: engine.backward + engine.step (DeepSpeed updates at its accumulation boundary).
    Returns whether the loss was finite on every rank (a bool tensor; no host sync). A non-finite
    micro-batch still counts: its backward is that of loss * NaN, so its gradients are NaN and ZeRO's
    overflow check at the boundary skips the update (no optimizer step, no LR step, gradients zeroed).
    Every `grad_accum` calls are thus exactly one DeepSpeed step, applied or skipped."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    ok = finite > 0
    engine.backward(loss * torch.where(ok, 1.0, float("nan")).to(loss.dtype))
    engine.step()
    return ok


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter (each rank holds a piece only)."""
    return hasattr(param, "ds_id")


def partition_layout(param: torch.Tensor) -> dict:
    """Where this rank's ZeRO-3 piece of `param` lies: {"shape": full shape, "numel": full numel,
    "offset": start in the flat parameter, "length": its elements without the padding}."""
    size = param.partition_numel()
    offset = param.ds_zero_partition_rank * size
    return {"shape": list(param.ds_shape), "numel": param.ds_numel, "offset": offset,
            "length": max(0, min(size, param.ds_numel - offset))}


def ema_params(engine) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs the EMA follows: the module's parameters (ZeRO-2), or this rank's fp32 master
    partition of every trained parameter without its padding (ZeRO-3; views of DeepSpeed's partitions)."""
    from deepspeed.utils import safe_get_local_fp32_param

    named = list(engine.module.named_parameters())
    if not any(is_partitioned(p) for _, p in named):
        return named
    return [(n, safe_get_local_fp32_param(p).narrow(0, 0, partition_layout(p)["length"]))
            for n, p in named if p.requires_grad]


def save(engine, ckpt_dir: str | Path, tag: str, ema: dict[str, torch.Tensor] | None = None) -> None:
    """ZeRO checkpoint `ckpt_dir/tag` (every rank calls it), with the metadata the universal conversion
    needs when there is no expert parallelism (which the conversion does not support), plus `weights/`:
    the experts of every expert-parallel rank and the EMA (see module docstring)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, \
        UNIVERSAL_CHECKPOINT_VERSION_VALUE

    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={} if engine.has_moe_layers else info,
                           save_latest=False)  # the tag is given at every load
    _save_weights(engine.module, Path(ckpt_dir) / tag / WEIGHTS_DIR, ema)


def _save_weights(model: nn.Module, out: Path, ema: dict[str, torch.Tensor] | None) -> None:
    from deepspeed.utils import groups

    experts = expert_params(model)
    partitioned = any(is_partitioned(p) for p in model.parameters())
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ema is not None and not partitioned:
            torch.save({n: t.cpu() for n, t in ema.items() if n not in experts}, out / EMA_FILE)
    dist.barrier()
    if ema is not None and partitioned:
        _save_ema_partitions(model, out / EMA_RANK_FILE.format(dist.get_rank()), ema)
    if experts:
        group = next(iter(experts.values())).group_name
        if groups._get_expert_data_parallel_rank(group) == 0:
            torch.save({"raw": {n: p.detach().cpu() for n, p in experts.items()},
                        "ema": {n: ema[n].cpu() for n in experts} if ema is not None else {}},
                       out / EXPERT_FILE.format(groups._get_expert_parallel_rank(group)))
    dist.barrier()


def _save_ema_partitions(model: nn.Module, path: Path, ema: dict[str, torch.Tensor]) -> None:
    """This rank's ZeRO-3 EMA partitions: {name: {"ema": tensor, **partition_layout}} (plain tensors and
    ints: loads with weights_only)."""
    params = dict(model.named_parameters())
    torch.save({n: {"ema": t.cpu(), **partition_layout(params[n])} for n, t in ema.items()}, path)


def load(engine, ckpt_dir: str | Path, tag: str, ema: dict[str, torch.Tensor] | None = None) -> None:
    """Resume from `save`'s checkpoint: DeepSpeed restores model, optimizer and LR schedule; its module
    file holds rank 0's experts only, so every rank's experts are then set from its own restored fp32
    master weights (ZeRO partitions). `ema` is filled in place: from the checkpoint when it holds one,
    else from the loaded weights (`ema_params`)."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    with torch.no_grad():
        for p in expert_params(engine.module).values():
            p.copy_(safe_get_full_fp32_param(p))
    if ema is None:
        return
    saved = saved_ema(Path(ckpt_dir) / tag, engine.module)
    with torch.no_grad():
        for n, t in ema_params(engine):
            ema[n].copy_(saved[n] if saved else t)


def saved_ema(step_dir: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's EMA tensors in a `save` checkpoint (under ZeRO-3 its pieces, cut from the assembled
    EMA: any data-parallel size); {} when it has none."""
    from deepspeed.utils import groups

    weights = step_dir / WEIGHTS_DIR
    if any(weights.glob(EMA_RANK_GLOB)):
        full = assemble_ema_partitions(step_dir)
        out = {}
        for n, p in model.named_parameters():
            if n in full:
                at = partition_layout(p)
                out[n] = full[n].reshape(-1).narrow(0, at["offset"], at["length"])
        return out
    if not (weights / EMA_FILE).is_file():
        return {}
    out = torch.load(weights / EMA_FILE, weights_only=True)
    experts = expert_params(model)
    if experts:
        rank = groups._get_expert_parallel_rank(next(iter(experts.values())).group_name)
        out.update(torch.load(weights / EXPERT_FILE.format(rank), weights_only=True)["ema"])
    return out


def assemble_ema_partitions(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full EMA tensors of a ZeRO-3 checkpoint from its ranks' `ema_rank<r>.pt` pieces (one process, no
    DeepSpeed): the pieces, in offset order, must tile each flat parameter."""
    files = sorted((Path(step_dir) / WEIGHTS_DIR).glob(EMA_RANK_GLOB))
    parts = [torch.load(f, weights_only=True) for f in files]
    out = {}
    for n, first in parts[0].items():
        pieces = sorted((part[n] for part in parts if part[n]["length"]), key=lambda piece: piece["offset"])
        starts = [piece["offset"] for piece in pieces]
        ends = [piece["offset"] + piece["length"] for piece in pieces]
        if starts != [0, *ends[:-1]] or ends[-1:] != [first["numel"]]:
            raise ValueError(f"{step_dir}: the EMA pieces of {n} do not tile its {first['numel']} elements")
        out[n] = torch.cat([piece["ema"] for piece in pieces]).view(first["shape"])
    return out


def has_ema(step_dir: str | Path) -> bool:
    """Whether a DeepSpeed step checkpoint holds EMA weights."""
    weights = Path(step_dir) / WEIGHTS_DIR
    return (weights / EMA_FILE).is_file() or any(weights.glob(EMA_RANK_GLOB))


def saved_ema_names(step_dir: str | Path) -> dict[str, str]:
    """{parameter name: name} of the EMA tensors a DeepSpeed step checkpoint holds; {} without an EMA."""
    weights = Path(step_dir) / WEIGHTS_DIR
    if not has_ema(step_dir):
        return {}
    names = set()
    for f in [*weights.glob(EMA_RANK_GLOB), *weights.glob(EMA_FILE)]:
        names |= set(torch.load(f, weights_only=True, mmap=True))
    for f in weights.glob("experts_ep*.pt"):
        names |= set(torch.load(f, weights_only=True, mmap=True)["ema"])
    return {n: n for n in sorted(names)}


def full_state_dict(step_dir: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded model state of a DeepSpeed step checkpoint, one process. Without expert parallelism
    the fp32 weights come from the ZeRO partitions (`get_fp32_state_dict_from_zero_checkpoint`); with it,
    the non-expert weights and the buffers from DeepSpeed's module file and each expert weight from the
    expert files (both in the training dtype), concatenated in expert order. `ema`: the parameters from the
    EMA (fp32; buffers stay raw; under ZeRO-3 assembled from the ranks' pieces)."""
    step_dir = Path(step_dir)
    files = sorted((step_dir / WEIGHTS_DIR).glob("experts_ep*.pt"))
    parts = [torch.load(f, weights_only=True) for f in files]
    if parts:
        sd = torch.load(step_dir / MODULE_FILE, map_location="cpu", weights_only=False)["module"]  # DeepSpeed's pickle
        sd.update({n: torch.cat([p["raw"][n] for p in parts]) for n in parts[0]["raw"]})
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if ema:
        if not has_ema(step_dir):
            raise ValueError(f"checkpoint {step_dir} holds no EMA weights (trained with train.ema_decay=0)")
        if any((step_dir / WEIGHTS_DIR).glob(EMA_RANK_GLOB)):
            sd.update(assemble_ema_partitions(step_dir))
            return sd
        sd.update(torch.load(step_dir / WEIGHTS_DIR / EMA_FILE, weights_only=True))
        sd.update({n: torch.cat([p["ema"][n] for p in parts]) for n in parts[0]["ema"]} if parts else {})
    return sd


def to_universal(ckpt_dir: str | Path, out_dir: str | Path, tag: str, workers: int = 1) -> Path:
    """DeepSpeed's `ds_to_universal` on checkpoint `ckpt_dir/tag`, into `out_dir/tag` (+ `latest`).
    One process; runs on CPU. Returns out_dir."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    src, dst = Path(ckpt_dir) / tag, Path(out_dir) / tag
    if not src.is_dir():
        raise FileNotFoundError(f"deepspeed checkpoint {src} does not exist")
    if any((src / WEIGHTS_DIR).glob("experts_ep*.pt")):
        raise ValueError(f"deepspeed checkpoint {src} was saved with expert parallelism: the universal conversion "
                         f"does not know its per-rank experts (resume at the same parallel.ep and world size)")
    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=workers,
                     num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    (Path(out_dir) / "latest").write_text(tag)
    return Path(out_dir)


def load_fp32_weights(model: nn.Module, ckpt_dir: str | Path, tag: str | None = None, ema: bool = False) -> nn.Module:
    """The full weights of a ZeRO-2/3 checkpoint (any DP and EP size; `tag` None: the `latest` one) into
    a plain `model` (strict); `ema`: the EMA weights."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or (ckpt_dir / "latest").read_text().strip()
    sd = full_state_dict(ckpt_dir / tag, ema=ema)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, strict=True)
    return model


__all__ = ["ds_config", "apply_expert_parallel_zero", "build_engine", "micro_step", "ema_params", "partition_layout",
           "save", "load", "full_state_dict", "assemble_ema_partitions", "has_ema", "saved_ema_names", "to_universal",
           "load_fp32_weights", "STAGES", "ZERO3_EP_REASON"]
