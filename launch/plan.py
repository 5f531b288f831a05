"""Per-rank memory, traffic and step-time plan of a preset on a cluster shape, before anyone books the cluster.

    python launch/plan.py --preset ec-m-64e --nodes 8 --gpus-per-node 8 --ep 8 16 64
    python launch/plan.py --nodes 2 --gpus-per-node 1 parallel=fsdp_ep model.dim=64 data.batch_size=4 ...

With Hydra overrides (those of `python -m train`) the model, parallel.ep, parallel.param_dtype, the
micro-batch and train.ema_decay are the run's, not --preset's / --ep's / --images-per-gpu's.

The model is built on the meta device and the real sharding plan (expert parallelism + FSDP2, as
`parallel/parallelize.py` applies it) is applied under torch's fake process group: a world of N ranks
in one process, nothing allocated. Per-rank parameter counts are read from the resulting DTensor
shards. Gradient, optimizer and activation memory and all-to-all traffic are estimates:

* params: sharded fp32 master weights (4 B); grads: sharded fp32 (4 B); optimizer: 2 fp32 states
  (AdamW: exp_avg, exp_avg_sq; RMSProp with momentum: square_avg, momentum_buffer); EMA: the torch
  engine's fp32 copy of the parameters, sharded like them, when --ema-decay (train.ema_decay) > 0;
* working set: the largest FSDP unit all-gathered in the compute dtype, twice (prefetch);
* activations (bf16, flash attention, no scores stored), per token per block: self-attention
  ~(5d + 2*kv_dim), cross-attention ~3d, FFN ~(d + 2F), a MoE FFN ~f_c*(d + 2F) + E, residuals ~4d;
  with activation checkpointing only each block's input (d) is kept, plus one block recomputed;
  text K/V: 2d per text token per block;
* all-to-all: per MoE layer and step, the off-rank share (ep-1)/ep of the E*X*d slot tensor (in
  parallel.param_dtype), dispatched and combined in forward and the same in backward (x4).

Traffic (`comm_bytes`) is per rank and step, in each direction, as ring collectives send it: an
all-gather or reduce-scatter over n ranks sends (n-1)/n of the unsharded tensor. FSDP2 all-gathers each
block in forward (param dtype) and again in backward, the root's own parameters once (the root is not
resharded after forward), and reduce-scatters the gradients in fp32; experts do the same over their
expert-data-parallel ranks (world / ep). gloo has no reduce-scatter of its own: torch runs it as an
allreduce, twice the bytes (--backend gloo). Ranks of one expert-parallel group are consecutive (ep is
the innermost mesh dim), so an all-to-all stays in the node when ep <= gpus per node.

Step time (`step_time`): the step's FLOPs (model/flops.py) at --peak-tflops x --efficiency, plus the
intra-node bytes at --intra-gbps and the inter-node bytes at --inter-gbps (per GPU, each direction),
nothing overlapped: an upper bound for a job whose communication is not hidden behind compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from model.config import ConfigError, DiTConfig, get_preset  # noqa: E402
from model.dit import DiT  # noqa: E402
from model.flops import train_step_flops  # noqa: E402
from model.routing import routing_groups  # noqa: E402

GiB = 2**30


def _init_fake_world(world: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's fake backend (no comms)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def sharded_params(cfg: DiTConfig, world: int, ep: int, act_ckpt: bool) -> tuple[int, int]:
    """(params on rank 0 after EP + FSDP, largest FSDP unit's unsharded params) on a fake world."""
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize
    _init_fake_world(world)
    try:
        with torch.device("meta"):
            model = DiT(cfg)
        pcfg = ParallelConfig(ep=ep, activation_checkpointing=act_ckpt).resolved(
            world, cfg.moe.num_experts if cfg.moe else None)
        parallelize(model, build_mesh(pcfg, world), pcfg)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        unit = 0
        for blk in model.blocks:  # an all-gathered block: dense weights in full, the rank's experts
            n = 0
            for name, p in blk.named_parameters():
                if ".experts." in name:
                    n += p.numel() // ep
                else:
                    n += p.numel()
            unit = max(unit, n)
        return local, unit
    finally:
        dist.destroy_process_group()


def activation_bytes(cfg: DiTConfig, images: int, tokens: int, text_len: int, act_ckpt: bool) -> int:
    d, F = cfg.dim, cfg.ffn_dim
    kv = 2 * cfg.kv_heads * cfg.head_dim
    T = images * tokens
    per_block = []
    for i in range(cfg.depth):
        ffn = (cfg.moe.experts_per_token * (d + 2 * F) + cfg.moe.num_experts) if cfg.is_moe_block(i) \
            else d + 2 * cfg.dense_ffn_dim(i)
        per_token = (5 * d + 2 * kv) + 3 * d + ffn + 4 * d
        per_block.append(2 * (T * per_token + images * text_len * 2 * d))
    if act_ckpt:
        return 2 * T * d * cfg.depth + max(per_block)
    return sum(per_block)


def alltoall_bytes(cfg: DiTConfig, images: int, tokens: int, ep: int, dtype_bytes: int = 2) -> int:
    """Bytes one rank sends to other ranks in the all-to-alls of one training step."""
    if cfg.moe is None or ep == 1:
        return 0
    groups, G = routing_groups(images, tokens, cfg.moe.group, cfg.moe.group_size)
    slots = groups * cfg.moe.num_experts * cfg.moe.capacity(G)  # E * X
    return int(4 * cfg.num_moe_blocks * slots * cfg.dim * dtype_bytes * (ep - 1) / ep)


def param_groups(cfg: DiTConfig) -> dict[str, int]:
    """Parameter counts by FSDP unit kind: the root's own ("root"), the blocks' dense ("blocks") and the
    experts' ("experts"), from a meta-device model."""
    with torch.device("meta"):
        model = DiT(cfg)
    counts = {"root": 0, "blocks": 0, "experts": 0}
    for name, p in model.named_parameters():
        kind = "root" if not name.startswith("blocks.") else "experts" if ".experts." in name else "blocks"
        counts[kind] += p.numel()
    return counts


def _spans_nodes(ranks: range, gpus_per_node: int) -> bool:
    return ranks[0] // gpus_per_node != ranks[-1] // gpus_per_node


def comm_bytes(cfg: DiTConfig, world: int, ep: int, images: int, gpus_per_node: int,
               param_dtype: str = "bf16", backend: str = "nccl") -> dict[str, float]:
    """Bytes one rank sends per training step (and receives: rings are symmetric), by collective and by
    link: {"fsdp_intra", "fsdp_inter", "alltoall_intra", "alltoall_inter"}. See the module docstring."""
    b_param, b_grad = (2 if param_dtype == "bf16" else 4), 4
    rs_factor = 2 if backend == "gloo" else 1
    groups = param_groups(cfg)
    if ep == 1:
        groups = {"root": groups["root"], "blocks": groups["blocks"] + groups["experts"], "experts": 0}
    out = {"fsdp_intra": 0.0, "fsdp_inter": 0.0, "alltoall_intra": 0.0, "alltoall_inter": 0.0}

    def fsdp(n_params: float, ranks: range, gathers: int) -> None:
        n = len(ranks)
        if n == 1 or n_params == 0:
            return
        share = (n - 1) / n * n_params
        link = "fsdp_inter" if _spans_nodes(ranks, gpus_per_node) else "fsdp_intra"
        out[link] += share * (gathers * b_param + rs_factor * b_grad)

    fsdp(groups["root"], range(world), gathers=1)
    fsdp(groups["blocks"], range(world), gathers=2)
    fsdp(groups["experts"] / ep, range(0, world, ep), gathers=2)
    a2a = alltoall_bytes(cfg, images, cfg.kept_tokens, ep, b_param) * ep / max(ep - 1, 1)  # all slots
    local = min(ep, gpus_per_node)
    out["alltoall_intra"] = a2a * (local - 1) / ep
    out["alltoall_inter"] = a2a * (ep - local) / ep
    return out


def step_time(cfg: DiTConfig, images: int, comm: dict[str, float], peak_tflops: float, efficiency: float,
              intra_gbps: float, inter_gbps: float, text_len: int | None = None) -> dict[str, float]:
    """Seconds per training step: compute, intra- and inter-node communication, and their sum."""
    compute = train_step_flops(cfg, images, text_len=text_len) / (peak_tflops * 1e12 * efficiency)
    intra = (comm["fsdp_intra"] + comm["alltoall_intra"]) * 8 / (intra_gbps * 1e9)
    inter = (comm["fsdp_inter"] + comm["alltoall_inter"]) * 8 / (inter_gbps * 1e9)
    return {"compute_s": compute, "intra_s": intra, "inter_s": inter, "step_s": compute + intra + inter}


@dataclass(frozen=True)
class Hardware:
    """A cluster's GPU and links: dense peak (TFLOP/s, in the compute dtype), the fraction of it a step
    reaches, and per-GPU bandwidth in each direction (Gbit/s) inside a node and between nodes."""

    peak_tflops: float = 989.0  # H100 SXM, bf16 dense
    efficiency: float = 0.4
    intra_gbps: float = 3600.0  # NVLink 4: 450 GB/s per direction
    inter_gbps: float = 400.0  # one 400 Gb/s InfiniBand NIC per GPU


def plan(cfg: DiTConfig, world: int, eps: list[int], images: int, act_ckpt: bool, text_len: int,
         ema: bool = True, gpus_per_node: int = 8, param_dtype: str = "bf16", backend: str = "nccl",
         hardware: Hardware = Hardware()) -> list[dict]:
    rows = []
    tokens = cfg.kept_tokens
    b_param = 2 if param_dtype == "bf16" else 4
    for ep in eps:
        local, unit = sharded_params(cfg, world, ep, act_ckpt)
        comm = comm_bytes(cfg, world, ep, images, gpus_per_node, param_dtype, backend)
        row = {"ep": ep, "world": world, "params_per_rank": local,
               "params_gib": local * 4 / GiB, "grads_gib": local * 4 / GiB, "optim_gib": local * 8 / GiB,
               "ema_gib": local * 4 / GiB if ema else 0.0,
               "working_gib": 2 * unit * b_param / GiB,
               "activations_gib": activation_bytes(cfg, images, tokens, text_len, act_ckpt) / GiB,
               "alltoall_gib_per_step": alltoall_bytes(cfg, images, tokens, ep, b_param) / GiB,
               "comm_bytes_per_step": comm,
               **step_time(cfg, images, comm, hardware.peak_tflops, hardware.efficiency, hardware.intra_gbps,
                           hardware.inter_gbps, text_len)}
        row["total_gib"] = sum(row[k] for k in ("params_gib", "grads_gib", "optim_gib", "ema_gib", "working_gib",
                                                "activations_gib"))
        rows.append(row)
    return rows


def run_config(overrides: list[str], world: int):
    """(model config, parallel config, micro-batch, EMA on) of `python -m train <overrides>` on `world` ranks."""
    from train.config import compose_app, validate_app
    app = compose_app(overrides)
    mcfg, pcfg = validate_app(app, world)
    return mcfg, pcfg, app.data.batch_size, app.train.ema_decay > 0


def _table(title: str, header: str, lines: list[str], footnote: str) -> None:
    print(title + "\n" + header + "\n" + "-" * len(header))
    print("\n".join(lines) + "\n" + footnote)


def main(argv=None) -> list[dict]:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of `python -m train` (replace --preset, --ep, "
                   "--images-per-gpu, --ema-decay and --param-dtype with the run's)")
    p.add_argument("--preset", default="ec-m-64e")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ep", type=int, nargs="+", default=None, help="expert-parallel sizes (default: 8 16 64)")
    p.add_argument("--images-per-gpu", type=int, default=32, help="micro-batch per rank (128 tokens each)")
    p.add_argument("--text-len", type=int, default=120)
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="train.ema_decay (conf/train/paper.yaml's); > 0 adds the EMA copy of the parameters")
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="parallel.param_dtype: what all-gathers and all-to-alls carry")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl",
                   help="gloo runs reduce-scatter as an allreduce (twice the bytes)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU to compare with")
    hw = Hardware()
    p.add_argument("--peak-tflops", type=float, default=hw.peak_tflops, help="per GPU (default: H100 bf16 dense)")
    p.add_argument("--efficiency", type=float, default=hw.efficiency, help="fraction of the peak a step reaches")
    p.add_argument("--intra-gbps", type=float, default=hw.intra_gbps,
                   help="Gbit/s per GPU and direction inside a node (default: NVLink 4)")
    p.add_argument("--inter-gbps", type=float, default=hw.inter_gbps,
                   help="Gbit/s per GPU and direction between nodes (default: 400 Gb/s InfiniBand)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "images_per_gpu", "peak_tflops", "efficiency", "intra_gbps",
                 "inter_gbps"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not 0 <= args.ema_decay < 1:
        raise SystemExit(f"error: --ema-decay={args.ema_decay} must be in [0, 1)")
    world = args.nodes * args.gpus_per_node
    images, ema, param_dtype, name = args.images_per_gpu, args.ema_decay > 0, args.param_dtype, args.preset
    try:
        if args.overrides:
            cfg, pcfg, images, ema = run_config(args.overrides, world)
            eps, param_dtype, name, text_len = [pcfg.ep], pcfg.param_dtype, " ".join(args.overrides), cfg.text_len
        else:
            cfg = get_preset(args.preset)
            eps = args.ep or ([e for e in (8, 16, 64) if cfg.moe and cfg.moe.num_experts % e == 0] or [1])
            text_len = args.text_len
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    hardware = Hardware(args.peak_tflops, args.efficiency, args.intra_gbps, args.inter_gbps)
    try:
        rows = plan(cfg, world, eps, images, args.act_ckpt, text_len, ema, args.gpus_per_node, param_dtype,
                    args.backend, hardware)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    _table(f"{name}: {world} ranks ({args.nodes} x {args.gpus_per_node}), {images} images x {cfg.kept_tokens} "
           f"tokens per rank, activation checkpointing {'on' if args.act_ckpt else 'off'}",
           f"{'EP':>4} {'params/rank':>12} {'params':>7} {'grads':>7} {'optim':>7} {'ema':>7} {'working':>8} "
           f"{'activ.':>7} {'total':>7} {'fits':>5} {'a2a/step':>9}",
           [f"{r['ep']:>4} {r['params_per_rank'] / 1e9:>11.3f}B {r['params_gib']:>6.1f}G {r['grads_gib']:>6.1f}G "
            f"{r['optim_gib']:>6.1f}G {r['ema_gib']:>6.1f}G {r['working_gib']:>7.1f}G {r['activations_gib']:>6.1f}G "
            f"{r['total_gib']:>6.1f}G {'yes' if r['total_gib'] <= args.gpu_gib else 'NO':>5} "
            f"{r['alltoall_gib_per_step']:>8.2f}G" for r in rows],
           f"(GiB per rank; params/grads/optimizer/EMA in fp32, sharded; working = two all-gathered blocks in "
           f"{param_dtype}; activations and all-to-all are estimates, see --help)")
    _table(f"\nstep time at {hardware.peak_tflops:g} TFLOP/s x {hardware.efficiency:g}, {hardware.intra_gbps:g} "
           f"Gbit/s in a node, {hardware.inter_gbps:g} Gbit/s between nodes ({args.backend}):",
           f"{'EP':>4} {'FSDP in':>9} {'FSDP out':>9} {'a2a in':>9} {'a2a out':>9} {'compute':>9} "
           f"{'comm in':>9} {'comm out':>9} {'step':>9}",
           [f"{r['ep']:>4} " + " ".join(f"{r['comm_bytes_per_step'][k] / 1e6:>7.1f}MB" for k in
                                        ("fsdp_intra", "fsdp_inter", "alltoall_intra", "alltoall_inter"))
            + " " + " ".join(f"{r[k]:>8.3g}s" for k in ("compute_s", "intra_s", "inter_s", "step_s")) for r in rows],
           "(bytes per rank and step in each direction, in the node / between nodes; step = compute + "
           "communication, not overlapped)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
