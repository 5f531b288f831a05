"""Expert parallelism through megatron-core's token dispatchers equals single-process, forward and backward.

Two gloo processes, EP = 2, float64: each rank routes its own local batch; the reference runs both
local batches through the unsharded model in one process (loss = the global batch's mean).
Gradient convention of `apply_expert_parallel`: expert gradients come out scaled by 1/ep, so that
averaging dense gradients over ranks gives the global mean loss's gradient everywhere.
Both megatron dispatchers (all-to-all, all-gather) and both routers (expert choice, token choice
with drops) run in the same two processes, one after another (megatron's import and parallel_state
set-up are paid once).
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist

from tests.parallel.helpers import batch_loss, rank_batch, reference_loss, spawn  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
TOL = dict(rtol=1e-14, atol=1e-15)  # outputs and gradients, float64 (passes at rtol=0, atol=1e-15)


def _check(rank, router, kind, mesh):
    from torch.distributed.tensor import DTensor

    from parallel.expert_parallel import apply_expert_parallel
    from parallel.megatron_dispatch import MegatronDispatcher
    from tests.model.helpers import tiny_model

    model, cfg = tiny_model("tiny-ec", moe=dict(router=router, group="tokens", group_size=16))
    ref = copy.deepcopy(model)
    ref_loss, ref_preds = reference_loss(ref, cfg, WORLD)  # both ranks' batches, one process
    ref_loss.backward()

    seen = {"empty_slots": 0, "calls": 0}

    class Recording(MegatronDispatcher):
        def __call__(self, x_TD, plan, experts):
            seen["calls"] += 1
            seen["empty_slots"] += 0 if plan.valid_EX is None else int((~plan.valid_EX).sum())
            return super().__call__(x_TD, plan, experts)

    apply_expert_parallel(model, mesh, make_dispatcher=lambda m: Recording(m, kind))
    loss, pred = batch_loss(model, rank_batch(cfg, rank))
    loss.backward()
    msg = f"{router}/{kind}"
    torch.testing.assert_close(pred, ref_preds[rank], **TOL, msg=msg)

    assert seen["calls"] == cfg.num_moe_blocks > 0
    if router == "token_choice":  # uneven per-expert counts: the padded path is exercised
        assert seen["empty_slots"] > 0
    local = cfg.moe.num_experts // WORLD
    checked = 0
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p_ref.grad is not None and p_ref.grad.abs().sum() > 0, name
        if isinstance(p, DTensor):  # this rank's expert shard of the reference gradient
            torch.testing.assert_close(p.grad.to_local(), p_ref.grad[rank * local:(rank + 1) * local],
                                       **TOL, msg=f"{msg} {name}")
            checked += 1
        else:  # replicated weights (router included): data-parallel mean of the ranks' gradients
            g = p.grad.clone()
            dist.all_reduce(g)
            g /= WORLD
            torch.testing.assert_close(g, p_ref.grad, **TOL, msg=f"{msg} {name}")
    assert checked == 2 * cfg.num_moe_blocks * (2 if cfg.ffn_bias else 1)


def _worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        for router in ("expert_choice", "token_choice"):
            for kind in ("alltoall", "allgather"):
                _check(rank, router, kind, mesh)
        dist.barrier()  # all ranks done before teardown (a race here aborted gloo processes)
    finally:
        dist.destroy_process_group()


def test_megatron_dispatchers_match_single_process(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    spawn(_worker, (str(tmp_path / "init"),), WORLD)


def test_routing_map_from_plan_expert_and_token_choice():
    """The plan -> (routing_map, probs) conversion: EC tokens taken by 0..E experts, TC drops absent."""
    from model.routing import RoutingPlan
    from parallel.megatron_dispatch import routing_map_from_plan

    idx = torch.tensor([[0, 2], [2, 3], [2, 0]])  # E=3, X=2, T=4: token 2 by all, token 1 by none
    gate = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], requires_grad=True)
    m, p = routing_map_from_plan(RoutingPlan(idx, gate, None, torch.zeros(()), 4))
    want = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(m, want)
    assert torch.equal(p.detach(), torch.tensor([[0.1, 0, 0.6], [0, 0, 0], [0.2, 0.3, 0.5], [0, 0.4, 0]]))
    p.sum().backward()
    assert torch.equal(gate.grad, torch.ones(3, 2))
    valid = torch.tensor([[True, False], [True, True], [False, False]])  # empty slots point at token 0
    m, p = routing_map_from_plan(RoutingPlan(idx, gate.detach() * valid, valid, torch.zeros(()), 4))
    want = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(m, want)
    assert p.sum().item() == pytest.approx(0.1 + 0.3 + 0.4)


def test_bad_kind_is_named():
    from parallel.megatron_dispatch import megatron_config
    with pytest.raises(ValueError, match="kind='alltoallv'"):
        megatron_config(4, 8, 16, 2, "alltoallv")
