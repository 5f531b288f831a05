"""Per-rank memory plan of a preset on a cluster shape, before anyone books the cluster.

    python launch/plan.py --preset ec-m-64e --nodes 8 --gpus-per-node 8 --ep 8 16 64

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
* all-to-all: per MoE layer and step, the off-rank share (ep-1)/ep of the E*X*d slot tensor (bf16),
  dispatched and combined in forward and the same in backward (x4).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from model.config import ConfigError, DiTConfig, get_preset  # noqa: E402
from model.dit import DiT  # noqa: E402
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


def alltoall_bytes(cfg: DiTConfig, images: int, tokens: int, ep: int) -> int:
    if cfg.moe is None or ep == 1:
        return 0
    groups, G = routing_groups(images, tokens, cfg.moe.group, cfg.moe.group_size)
    slots = groups * cfg.moe.num_experts * cfg.moe.capacity(G)  # E * X
    return int(4 * cfg.num_moe_blocks * slots * cfg.dim * 2 * (ep - 1) / ep)


def plan(cfg: DiTConfig, world: int, eps: list[int], images: int, act_ckpt: bool, text_len: int,
         ema: bool = True) -> list[dict]:
    rows = []
    tokens = cfg.kept_tokens
    for ep in eps:
        local, unit = sharded_params(cfg, world, ep, act_ckpt)
        row = {"ep": ep, "world": world, "params_per_rank": local,
               "params_gib": local * 4 / GiB, "grads_gib": local * 4 / GiB, "optim_gib": local * 8 / GiB,
               "ema_gib": local * 4 / GiB if ema else 0.0,
               "working_gib": 2 * unit * 2 / GiB,
               "activations_gib": activation_bytes(cfg, images, tokens, text_len, act_ckpt) / GiB,
               "alltoall_gib_per_step": alltoall_bytes(cfg, images, tokens, ep) / GiB}
        row["total_gib"] = sum(row[k] for k in ("params_gib", "grads_gib", "optim_gib", "ema_gib", "working_gib",
                                                "activations_gib"))
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ec-m-64e")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ep", type=int, nargs="+", default=None, help="expert-parallel sizes (default: 8 16 64)")
    p.add_argument("--images-per-gpu", type=int, default=32, help="micro-batch per rank (128 tokens each)")
    p.add_argument("--text-len", type=int, default=120)
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="train.ema_decay (conf/train/paper.yaml's); > 0 adds the EMA copy of the parameters")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU to compare with")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    try:
        cfg = get_preset(args.preset)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if not 0 <= args.ema_decay < 1:
        raise SystemExit(f"error: --ema-decay={args.ema_decay} must be in [0, 1)")
    world = args.nodes * args.gpus_per_node
    eps = args.ep or ([e for e in (8, 16, 64) if cfg.moe and cfg.moe.num_experts % e == 0] or [1])
    try:
        rows = plan(cfg, world, eps, args.images_per_gpu, args.act_ckpt, args.text_len, args.ema_decay > 0)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.preset}: {world} ranks ({args.nodes} x {args.gpus_per_node}), {args.images_per_gpu} images x "
          f"{cfg.kept_tokens} tokens per rank, activation checkpointing {'on' if args.act_ckpt else 'off'}")
    hdr = (f"{'EP':>4} {'params/rank':>12} {'params':>7} {'grads':>7} {'optim':>7} {'ema':>7} {'working':>8} "
           f"{'activ.':>7} {'total':>7} {'fits':>5} {'a2a/step':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        fits = "yes" if r["total_gib"] <= args.gpu_gib else "NO"
        print(f"{r['ep']:>4} {r['params_per_rank'] / 1e9:>11.3f}B {r['params_gib']:>6.1f}G {r['grads_gib']:>6.1f}G "
              f"{r['optim_gib']:>6.1f}G {r['ema_gib']:>6.1f}G {r['working_gib']:>7.1f}G {r['activations_gib']:>6.1f}G "
              f"{r['total_gib']:>6.1f}G {fits:>5} {r['alltoall_gib_per_step']:>8.2f}G")
    print("(GiB per rank; params/grads/optimizer/EMA in fp32, sharded; working = two all-gathered blocks in bf16; "
          "activations and all-to-all are estimates, see --help)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
