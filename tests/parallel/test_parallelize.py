"""EP + FSDP2 on 2 and 4 gloo processes equals one process: loss, gradients, and optimizer steps."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.parallel.helpers import batch_loss, rank_batch, reference_loss, run_workers

pytestmark = pytest.mark.distributed


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _parity(rank, world, ep, router, steps, dispatcher="alltoall", dp_replicate=1):
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize
    from tests.model.helpers import tiny_model

    model, cfg = tiny_model("tiny-ec", moe=dict(router=router, group="tokens", group_size=32))
    ref = copy.deepcopy(model)
    pcfg = ParallelConfig(ep=ep, dispatcher=dispatcher, dp_replicate=dp_replicate).resolved(world, cfg.moe.num_experts)
    mesh = build_mesh(pcfg, world)
    parallelize(model, mesh, pcfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        # Reference: the global batch = every rank's local batch, each routed on its own; mean loss.
        ref_loss = reference_loss(ref, cfg, world, step=step)[0]
        ref_opt.zero_grad()
        ref_loss.backward()
        loss, _ = batch_loss(model, rank_batch(cfg, rank, step=step))
        opt.zero_grad()
        loss.backward()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        torch.testing.assert_close(global_loss / world, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        if step == 0:
            for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(full(p.grad), p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
        ref_opt.step()
        opt.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p.data), p_ref.data, rtol=1e-9, atol=1e-12, msg=name)
    if ep > 1:
        w1 = model.blocks[1].ffn.experts.w1
        assert w1.to_local().shape[0] <= cfg.moe.num_experts // ep  # experts really are split


@pytest.mark.parametrize("world, ep, router, dispatcher, dp_replicate", [
    (2, 2, "expert_choice", "alltoall", 1), (2, 2, "token_choice", "alltoall", 1),
    (2, 1, "expert_choice", "alltoall", 1), (4, 2, "expert_choice", "alltoall", 1),
    (4, 4, "token_choice", "alltoall", 1),
    (2, 2, "expert_choice", "megatron_alltoall", 1), (4, 2, "token_choice", "megatron_allgather", 1),
    (4, 4, "expert_choice", "megatron_alltoall", 1),
    (4, 2, "expert_choice", "alltoall", 2),  # HSDP: replicate x (shard over ep)
])
def test_ep_fsdp_matches_single_process(tmp_path, world, ep, router, dispatcher, dp_replicate):
    run_workers(_parity, world, tmp_path, ep, router, 3, dispatcher, dp_replicate)


def _meta_init(rank, world):
    from model.config import get_preset
    from model.dit import DiT
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize

    cfg = get_preset("tiny-ec")
    with torch.device("meta"):
        model = DiT(cfg)
    # Activation checkpointing and FSDP2 mixed precision (bf16 compute, fp32 reduce) on top.
    pcfg = ParallelConfig(ep=2, activation_checkpointing=True, param_dtype="bf16").resolved(world, cfg.moe.num_experts)
    parallelize(model, build_mesh(pcfg, world), pcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(x, torch.rand(2), torch.randn(2, cfg.text_len, cfg.text_dim))
    assert out.pred.dtype == torch.bfloat16
    out.pred.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(full(p.data)).all() and p.grad is not None, name
    w1 = model.blocks[1].ffn.experts.w1
    assert w1.to_local().shape[0] == cfg.moe.num_experts // 2 // 1


def test_meta_build_parallelize_ac_bf16_then_init(tmp_path):
    run_workers(_meta_init, 2, tmp_path)


def test_bad_parallel_config_names_the_field():
    from model.config import ConfigError
    from parallel.mesh import ParallelConfig
    with pytest.raises(ConfigError, match="model.moe.num_experts=6"):
        ParallelConfig(ep=4).resolved(4, 6)
    with pytest.raises(ConfigError, match="parallel.ep=3"):
        ParallelConfig(ep=3).resolved(4, 6)
    with pytest.raises(ConfigError, match="parallel.dp_replicate"):
        ParallelConfig(dp_replicate=3).resolved(4, 8)
    with pytest.raises(ConfigError, match="parallel.dispatcher"):
        ParallelConfig(dispatcher="nccl").resolved(2, 8)
