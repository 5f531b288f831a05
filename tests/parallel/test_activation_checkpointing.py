"""`parallel.activation_checkpointing=true` through the trainer's model builder (train/trainer.py `build_network`;
2 gloo processes with FSDP2 + expert parallelism, and one process): every block's forward runs again in
backward, far fewer bytes are saved for backward, and the gradients and router thresholds are those of the
run without it."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.parallel.helpers import batch_loss, rank_batch, run_workers




def _step(rank, world, checkpointing: bool):
    """Build as the trainer does, run one forward and backward; return the calls of each block's forward in
    forward and again in backward, the bytes saved for backward, the local gradients and the routers'
    threshold update counts."""
    from model.config import get_preset
    from model.dit import DiTBlock
    from parallel.mesh import ParallelConfig
    from train.config import TrainCfg
    from train.trainer import build_network as _build

    cfg = get_preset("tiny-ec")
    pcfg = ParallelConfig(ep=min(2, world), activation_checkpointing=checkpointing).resolved(world,
                                                                                          cfg.moe.num_experts)
    model = _build(cfg, pcfg, TrainCfg(seed=0), world, torch.device("cpu"))
    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    assert len(blocks) == cfg.depth
    calls = [0] * len(blocks)
    for i, blk in enumerate(blocks):
        blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = batch_loss(model, rank_batch(cfg, rank, batch=8, dtype=torch.float32))
    forward_calls = list(calls)
    loss.backward()
    backward_calls = [c - f for c, f in zip(calls, forward_calls)]
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad.to_local() if isinstance(p.grad, DTensor)
             else p.grad.clone() for name, p in model.named_parameters()}
    updates = [b.item() for name, b in model.named_buffers() if name.endswith("threshold_updates")]
    return forward_calls, backward_calls, saved[0], grads, updates


def _compare(rank, world):
    fwd, bwd, saved, grads, updates = _step(rank, world, checkpointing=False)
    fwd_ac, bwd_ac, saved_ac, grads_ac, updates_ac = _step(rank, world, checkpointing=True)
    assert fwd == fwd_ac == [1] * len(fwd)
    assert bwd == [0] * len(bwd), bwd
    assert bwd_ac == [1] * len(bwd_ac), bwd_ac  # recomputed in backward
    assert saved_ac < saved / 8, (saved_ac, saved)
    assert updates and updates == updates_ac == [1.0] * len(updates)  # the recomputation updates no EMA
    assert grads.keys() == grads_ac.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.distributed
def test_activation_checkpointing_recomputes_blocks_and_saves_less(tmp_path):
    run_workers(_compare, 2, tmp_path)


def test_activation_checkpointing_in_one_process_recomputes_blocks_and_saves_less():
    _compare(0, 1)
