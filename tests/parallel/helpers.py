"""Helpers for multi-process tests: start gloo workers from a forkserver, per-rank batches, a deterministic loss."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor", "model.dit",
           "parallel.parallelize", "tests.model.helpers", "tests.parallel.helpers"]


def spawn(fn, args: tuple, nprocs: int) -> None:
    """mp.spawn(fn, args, nprocs) with this process's environment, the processes forked from a forkserver
    that imported PRELOAD once and runs nothing else, instead of each starting an interpreter."""
    mp.set_forkserver_preload(PRELOAD)  # read when the server first starts
    mp.start_processes(_with_env, args=(fn, dict(os.environ), args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def _with_env(rank, fn, env, args):
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def run_workers(fn, world: int, tmp_path, *args) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes (file:// rendezvous, 1 thread each; `spawn`)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(_entry, (fn, world, str(tmp_path / "pg-init"), args), world)


def _entry(rank, fn, world, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        dist.destroy_process_group()


def rank_batch(cfg, rank, batch=4, step=0, dtype=None):
    """Rank r's local batch (x, t, ctx, mask, keep); different per rank and per step."""
    from tests.model.helpers import tiny_batch
    dtype = dtype or torch.float64
    x, t, ctx, mask = tiny_batch(cfg, batch, seed=1000 * step + 10 + rank, dtype=dtype)
    g = torch.Generator().manual_seed(1000 * step + rank)
    keep = torch.rand(batch, cfg.num_tokens, generator=g).argsort(1)[:, :cfg.kept_tokens].sort(1).values
    return x, t, ctx, mask, keep


def batch_loss(model, batch):
    """A loss that exercises the whole model: squared prediction + MoE aux loss; returns (loss, pred)."""
    x, t, ctx, mask, keep = batch
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    drop[0] = True
    out = model(x, t, ctx, mask, keep_idx_BK=keep, text_drop_B=drop)
    return out.pred.square().mean() + out.aux_loss, out.pred


def reference_loss(ref_model, cfg, world, step=0):
    """The global batch's mean loss on the unsharded model, every rank's local batch routed on its own
    (what `world` data-parallel ranks compute together); returns (loss, per-rank predictions)."""
    losses, preds = zip(*(batch_loss(ref_model, rank_batch(cfg, r, step=step)) for r in range(world)))
    return sum(losses) / world, list(preds)
