"""Expert-parallel MoE layer: step time (forward + backward) and bytes moved, four dispatch paths.

    python bench/ep.py [--preset small-ec] [--ep 2] [--batch 8] [--iters 10] [--device cpu] [--out FILE.json]

One MoE layer (the first MoE block's `MoEFeedForward`: router + dispatch + experts + combine), the same
global work for every path, measured round-robin in one run of `--ep` processes (gloo on CPU, one
thread each; nccl on CUDA):
  local               no EP: one process runs all ep ranks' tokens through all experts (the others wait)
  alltoall            our AllToAllDispatcher: equal-split all-to-all of the [E, X, D] slot tensor
  megatron_alltoall   megatron-core MoEAlltoAllTokenDispatcher fed with our routing map
  megatron_allgather  megatron-core MoEAllGatherTokenDispatcher (all-gather tokens, reduce-scatter back)
Step time of an EP path = the slowest rank's; `*_ratio` = path / local (ideal at ep=2 on 2 cores: 0.5).

Bytes: per rank and step (forward + backward), the logical payload this rank sends to OTHER ranks
(tensor bytes x the fraction that leaves the rank; what a ring all-gather forwards on behalf of others
is not counted), computed from the actual routing of the timed batch:
  alltoall            4 x (ep-1)/ep x E*X*D (dispatch, combine, and their gradients; empty TC slots included)
  megatron_alltoall   4 x R*D + 2 x R (probs and their gradient) + split-size exchange, R = this rank's
                      routed (token, expert) pairs whose expert lives on another rank
  megatron_allgather  4 x (ep-1)*T*D (gather, reduce-scatter, gradients) + (ep-1)*T*E x (2 x probs + map)
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import environment, parser, round_robin, write_json  # noqa: E402

PATHS = ("local", "alltoall", "megatron_alltoall", "megatron_allgather")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _worker(rank: int, args, init_file: str, result_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    # megatron-core warns at import that Transformer Engine / Apex are missing, and calls deprecated
    # c10d names; neither matters here.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    dev = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.ep)
    try:
        fig = _run(rank, args, dev)
        if rank == 0:
            Path(result_file).write_text(json.dumps(fig))
    finally:
        dist.destroy_process_group()


def _run(rank: int, args, dev: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from model.config import get_preset
    from model.dit import build_model
    from parallel.expert_parallel import AllToAllDispatcher, apply_expert_parallel
    from parallel.megatron_dispatch import MegatronDispatcher

    ep = args.ep
    moe = {"router": args.router} if args.router else {}
    cfg = get_preset(args.preset, **({"moe": moe} if moe else {}))
    if cfg.moe is None:
        raise SystemExit(f"--preset {args.preset} has no MoE layers; pick an EC or TC preset")
    base = build_model(cfg, seed=0).to(dev)
    mesh = init_device_mesh(dev.type, (ep,), mesh_dim_names=("ep",))
    makers = {"alltoall": AllToAllDispatcher,
              "megatron_alltoall": lambda m: MegatronDispatcher(m, "alltoall"),
              "megatron_allgather": lambda m: MegatronDispatcher(m, "allgather")}
    first_moe = next(i for i, b in enumerate(base.blocks) if b.is_moe)
    layers = {"local": base.blocks[first_moe].ffn}
    for name, make in makers.items():
        layers[name] = apply_expert_parallel(copy.deepcopy(base), mesh, make_dispatcher=make).blocks[first_moe].ffn

    B, S, D = args.batch, cfg.kept_tokens, cfg.dim
    g = torch.Generator().manual_seed(0)
    h_all = [torch.randn(B, S, D, generator=g).to(dev) for _ in range(ep)]  # every rank's local batch
    r_all = [torch.randn(B, S, D, generator=g).to(dev) for _ in range(ep)]
    inputs = {"local": (torch.cat(h_all), torch.cat(r_all))}
    for name in makers:
        inputs[name] = (h_all[rank], r_all[rank])

    def step(name: str) -> float:
        dist.barrier()
        if name == "local" and rank != 0:
            elapsed = 0.0
        else:
            layer = layers[name]
            h, r = (t.detach().requires_grad_() for t in inputs[name])
            _sync(dev)
            t0 = time.perf_counter()
            out, plan = layer(h, r, collect_stats=False)
            (out.square().mean() + plan.aux_loss).backward()
            _sync(dev)
            elapsed = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
        slowest = torch.tensor([elapsed], dtype=torch.float64, device=dev)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return slowest.item()

    times = round_robin(step, PATHS, args.warmup, args.iters)

    # Bytes from the routing of this rank's timed batch.
    with torch.no_grad():
        plan = layers["local"].router(r_all[rank])
    E, X = plan.idx_EX.shape
    T = B * S
    elt = torch.empty((), dtype=h_all[0].dtype).element_size()
    valid = torch.ones(E, X, dtype=torch.bool) if plan.valid_EX is None else plan.valid_EX.cpu()
    local = E // ep
    own = torch.zeros(E, dtype=torch.bool)
    own[rank * local:(rank + 1) * local] = True
    remote = int(valid[~own].sum())
    bytes_ = {"local": 0,
              "alltoall": int(4 * (ep - 1) / ep * E * X * D * elt),
              "megatron_alltoall": 4 * remote * D * elt + 2 * remote * elt + (ep - 1) * E * 8,
              "megatron_allgather": (ep - 1) * T * (4 * D * elt + E * (2 * elt + 1))}

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    fig = environment(str(dev))
    fig.update(preset=cfg.name, router=cfg.moe.router, ep=ep, batch_per_rank=B, tokens_per_rank=T,
               slots_per_expert=X, num_experts=E, dim=D, iters=args.iters, processes=ep)
    for name in PATHS:
        fig[f"{name}_step_ms"] = round(med[name], 3)
        fig[f"{name}_vs_local_ratio"] = round(med[name] / med["local"], 4)
        fig[f"{name}_bytes"] = bytes_[name]
    return fig


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], "small-ec")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size = processes (default 2)")
    p.add_argument("--batch", type=int, default=8, help="images per rank (default 8)")
    p.add_argument("--router", choices=["expert_choice", "token_choice"], default=None,
                   help="override the preset's router")
    p.add_argument("--iters", type=int, default=10, help="timed steps per path (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.ep < 2:
        p.error(f"--ep={args.ep} must be >= 2")
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.ep:
        p.error(f"--device {args.device} needs {args.ep} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        init, result = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, init, result), nprocs=args.ep, join=True)
        fig = json.loads(Path(result).read_text())
    print(f"preset {fig['preset']} ({fig['router']}): ep {fig['ep']}, {fig['batch_per_rank']} images = "
          f"{fig['tokens_per_rank']} tokens per rank, E={fig['num_experts']}, X={fig['slots_per_expert']}, "
          f"D={fig['dim']}, {fig['device']}, 1 thread per process, median of {fig['iters']}")
    hdr = f"{'path':<20} {'step ms':>9} {'vs local':>9} {'MiB sent/rank/step':>19}"
    print(hdr)
    print("-" * len(hdr))
    for name in PATHS:
        print(f"{name:<20} {fig[name + '_step_ms']:>9.1f} {fig[name + '_vs_local_ratio']:>8.3f}x "
              f"{fig[name + '_bytes'] / 2**20:>19.2f}")
    print("local = one process doing all ranks' work; EP paths: slowest rank's time")
    write_json(args.out, fig)
    return fig


if __name__ == "__main__":
    main()
