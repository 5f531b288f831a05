"""The global gradient norm and clipping of parallel/distributed.py on 2 gloo processes (FSDP2, FSDP2 + expert
parallelism, plain data parallelism through DDP) equal one process on the same global batch."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.parallel.helpers import batch_loss, rank_batch, reference_loss, run_workers

pytestmark = pytest.mark.distributed

MODES = {"fsdp": dict(ep=1), "fsdp_ep": dict(ep=2), "ddp": dict(ep=1, fsdp=False)}


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _same_on_every_rank(x: torch.Tensor, world: int) -> None:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    for p in parts[1:]:
        assert torch.equal(p, parts[0]), parts


def _setup(world, mode):
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize
    from tests.model.helpers import tiny_model

    model, cfg = tiny_model("tiny-ec", moe=dict(group="tokens", group_size=32))
    ref = copy.deepcopy(model)
    pcfg = ParallelConfig(**MODES[mode]).resolved(world, cfg.moe.num_experts)
    parallelize(model, build_mesh(pcfg, world), pcfg)
    return model, ref, cfg


def _norm_and_clip(rank, world, mode):
    from parallel.distributed import clip_grad_norm_

    model, ref, cfg = _setup(world, mode)
    batch_loss(model, rank_batch(cfg, rank))[0].backward()
    reference_loss(ref, cfg, world)[0].backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    norm = clip_grad_norm_(model.parameters(), 0.0)
    _same_on_every_rank(norm, world)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-12, atol=0)
    if mode == "fsdp_ep":
        assert {p.grad.device_mesh.mesh_dim_names for p in model.parameters()} == {("dp_shard",),
                                                                                   ("dp_shard_mod_ep", "ep")}
    max_norm = ref_norm.item() / 3
    torch.testing.assert_close(clip_grad_norm_(model.parameters(), max_norm), ref_norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(clip_grad_norm_(model.parameters(), 0.0).item(), max_norm, rtol=1e-6, atol=0)
    scale = max_norm / (ref_norm + 1e-6)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p.grad), p_ref.grad * scale, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("mode", ["fsdp", "fsdp_ep"])
def test_sharded_grad_norm_equals_one_process(tmp_path, mode):
    run_workers(_norm_and_clip, 2, tmp_path, mode)


def _ddp_steps(rank, world, steps):
    from parallel.distributed import clip_grad_norm_

    model, ref, cfg = _setup(world, "ddp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        batch_loss(model, rank_batch(cfg, rank, step=step))[0].backward()
        reference_loss(ref, cfg, world, step=step)[0].backward()
        norm = clip_grad_norm_(model.parameters(), 0.5)  # clips: the norms here are > 1
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5), rtol=1e-12, atol=0)
        assert norm > 0.5
        opt.step()
        ref_opt.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        _same_on_every_rank(p.detach(), world)
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=1e-9, atol=1e-12, msg=name)


def _ddp_accumulation(rank, world):
    """Two micro-batches, only the second backward reducing (TorchBackend.sync_grads), give the gradient of
    the mean loss over both micro-batches of both ranks."""
    from train.backends import TorchBackend

    model, ref, cfg = _setup(world, "ddp")
    backend = TorchBackend(model, None, None, None, None, None)
    for micro in range(2):
        backend.sync_grads(micro == 1)
        backend.micro_step(batch_loss(model, rank_batch(cfg, rank, step=micro))[0], 2)
        if micro == 0:  # not reduced: each rank's own gradient
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            parts = [torch.empty_like(grads) for _ in range(world)]
            dist.all_gather(parts, grads)
            assert not torch.equal(parts[0], parts[1])
        (reference_loss(ref, cfg, world, step=micro)[0] / 2).backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-14, msg=name)


def _ddp(rank, world, steps):
    _norm_and_clip(rank, world, "ddp")
    _ddp_steps(rank, world, steps)
    _ddp_accumulation(rank, world)


def test_ddp_grad_norm_steps_and_accumulation_equal_one_process(tmp_path):
    run_workers(_ddp, 2, tmp_path, 3)
