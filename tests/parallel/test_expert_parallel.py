"""Expert parallelism (plain torch.distributed all-to-all) equals single-process, forward and backward.

Two gloo processes, EP = 2: each rank routes its own local batch; the reference runs both local
batches through the unsharded model in one process.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from tests.parallel.helpers import batch_loss, rank_batch, reference_loss, run_workers

pytestmark = pytest.mark.distributed

WORLD = 2


def _worker(rank, world, router):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from parallel.expert_parallel import apply_expert_parallel
    from tests.model.helpers import tiny_model

    model, cfg = tiny_model("tiny-ec", moe=dict(router=router, group="tokens", group_size=16))
    ref = copy.deepcopy(model)
    ref_loss, ref_preds = reference_loss(ref, cfg, WORLD)  # both ranks' batches, one process
    ref_loss.backward()

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    apply_expert_parallel(model, mesh)
    loss, pred = batch_loss(model, rank_batch(cfg, rank))
    loss.backward()
    torch.testing.assert_close(pred, ref_preds[rank], rtol=1e-12, atol=1e-12)

    E = cfg.moe.num_experts
    local = E // WORLD
    checked_experts = 0
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if isinstance(p, DTensor):  # expert weights: this rank's shard of the reference gradient
            assert p.to_local().shape[0] == local
            torch.testing.assert_close(p.grad.to_local(), p_ref.grad[rank * local:(rank + 1) * local],
                                       rtol=1e-10, atol=1e-12, msg=name)
            checked_experts += 1
        else:  # replicated weights: data-parallel mean of the ranks' gradients
            g = p.grad.clone()
            dist.all_reduce(g)
            g /= WORLD
            torch.testing.assert_close(g, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert checked_experts == 2 * cfg.num_moe_blocks * (2 if cfg.ffn_bias else 1)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_expert_parallel_matches_single_process(tmp_path, router):
    run_workers(_worker, WORLD, tmp_path, router)
