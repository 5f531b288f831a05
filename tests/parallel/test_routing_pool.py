"""DiffMoE's global token pool across data-parallel ranks: two gloo processes, each with its own local
batch, route exactly as one process routing the concatenated batch as one pool; expert thresholds stay
identical on every rank."""

import pytest
import torch
import torch.distributed as dist

from tests.parallel.helpers import run_workers

pytestmark = pytest.mark.distributed

WORLD, B, S, D = 2, 2, 32, 16


def _router(global_pool: bool):
    from model.config import MoEConfig
    from model.routing import Router
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, router="diffmoe", group="batch", global_pool=global_pool, pool_slack=4.0)
    r = Router(D, cfg).double()
    r.init_weights()
    r.predictor.init_weights()
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    return r


def _inputs(rank):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _worker(rank, world):
    from parallel.routing_pool import RankPool

    ref = _router(global_pool=True)  # one process: the concatenated batch is one pool
    x_all = torch.cat([_inputs(r) for r in range(world)])
    ref_plan = ref(x_all)
    T = B * S
    mine = slice(rank * T, (rank + 1) * T)

    r = _router(global_pool=True)
    r.pool = RankPool()
    plan = r(_inputs(rank))
    assert plan.valid_EX is not None and plan.stats["pool_overflow"] == 0
    for e in range(r.cfg.num_experts):
        ref_tokens = {int(i) - rank * T for i in ref_plan.idx_EX[e] if mine.start <= int(i) < mine.stop}
        got = {int(i) for i, v in zip(plan.idx_EX[e], plan.valid_EX[e]) if v}
        assert got == ref_tokens, (rank, e)
        # per expert: the slots of this rank hold exactly the reference's gates of its tokens
        ref_gate = {int(i) - rank * T: float(g) for i, g in zip(ref_plan.idx_EX[e], ref_plan.gate_EX[e])
                    if mine.start <= int(i) < mine.stop}
        for i, g, v in zip(plan.idx_EX[e], plan.gate_EX[e], plan.valid_EX[e]):
            assert (float(g) == pytest.approx(ref_gate[int(i)])) if v else float(g) == 0.0
    # the local token counts differ between ranks, but the global capacity is met exactly
    total = torch.tensor(plan.valid_EX.sum(1).double())
    dist.all_reduce(total)
    assert total.tolist() == [float(ref.cfg.capacity(WORLD * T))] * r.cfg.num_experts
    # the thresholds: the pool's cut-off, the same on every rank and as in one process
    torch.testing.assert_close(r.threshold_E, ref.threshold_E)

    # Without the global pool each rank routes its own batch; the threshold EMA is still all-reduced.
    local = _router(global_pool=False)
    local.pool = RankPool()
    local(_inputs(rank))
    th = local.threshold_E.clone()
    gathered = [torch.empty_like(th) for _ in range(world)]
    dist.all_gather(gathered, th)
    torch.testing.assert_close(gathered[0], gathered[1])
    solo = [_router(global_pool=False) for _ in range(world)]
    for q, s in enumerate(solo):
        s(_inputs(q))
    torch.testing.assert_close(th, (solo[0].threshold_E + solo[1].threshold_E) / 2)


def test_global_pool_equals_one_process_routing_the_whole_batch(tmp_path):
    run_workers(_worker, WORLD, tmp_path)


def _ep_fsdp_parity(rank, world):
    import copy

    from torch.distributed.tensor import DTensor

    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize
    from parallel.routing_pool import install_routing_pool
    from tests.model.helpers import tiny_model
    from tests.parallel.helpers import rank_batch

    model, cfg = tiny_model("tiny-diffmoe", moe=dict(global_pool=True, pool_slack=4.0))
    ref = copy.deepcopy(model)
    pcfg = ParallelConfig(ep=2).resolved(world, cfg.moe.num_experts)
    parallelize(model, build_mesh(pcfg, world), pcfg)
    assert install_routing_pool(model) == cfg.num_moe_blocks

    def loss_of(m, batches):
        x, t, ctx, mask, keep = (torch.cat(z) for z in zip(*batches))
        drop = torch.zeros(x.shape[0], dtype=torch.bool)
        drop[::x.shape[0] // len(batches)] = True  # the first image of every rank's batch
        out = m(x, t, ctx, mask, keep_idx_BK=keep, text_drop_B=drop)
        return out.pred.square().mean() + out.aux_loss

    # Reference: one process, the ranks' batches concatenated and routed as one pool.
    ref_loss = loss_of(ref, [rank_batch(cfg, r) for r in range(world)])
    ref_loss.backward()
    loss = loss_of(model, [rank_batch(cfg, rank)])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(g, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
    for r_dist, r_ref in zip(model.routers(), ref.routers()):
        torch.testing.assert_close(r_dist.threshold_E, r_ref.threshold_E)


def test_global_pool_with_ep_and_fsdp_matches_one_process(tmp_path):
    run_workers(_ep_fsdp_parity, WORLD, tmp_path)
