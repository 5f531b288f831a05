"""torch.compile of the DiT blocks (parallel/compile.py): one graph per block kind (fullgraph), and the
compiled training step equals the eager one for every router (compiled sampling, eval routing and the
expert-load meter: tests/train/test_sample.py).

Two-block models keep the compile time short: block 0 is dense, block 1 the MoE block, so every case
checks a dense block too."""

import pytest
import torch
from torch._dynamo.utils import counters

from model.config import get_preset
from model.dit import build_model
from model.flow import FlowConfig, flow_loss
from parallel.compile import compile_blocks
from parallel.fsdp import apply_activation_checkpointing


def _train_step(model, cfg, collect_stats: bool):
    """Loss, gradients, routing statistics and router buffers of one forward + backward."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    ctx = torch.randn(4, cfg.text_len, cfg.text_dim, generator=g)
    out = flow_loss(model, x0, ctx, None, FlowConfig(), generator=torch.Generator().manual_seed(1),
                    collect_stats=collect_stats)
    out["loss"].backward()
    def fqn(name):  # without the activation-checkpoint wrapper's prefix
        return name.replace("_checkpoint_wrapped_module.", "")

    grads = {fqn(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = {fqn(n): b.clone() for n, b in model.named_buffers() if "threshold" in n}
    return out["loss"].detach(), grads, out["out"].moe_stats, buffers


# Inductor (generated kernels) once, for expert choice as bench/step.py runs it (no statistics); every
# router, routing statistics and activation checkpointing through aot_eager, which traces the same
# forward and backward graphs (fullgraph) without the kernel compile time.
@pytest.mark.parametrize("preset,checkpointing,backend,stats", [
    pytest.param("tiny-ec", False, "inductor", False, marks=pytest.mark.slow),  # ~30 s with a cold cache
    ("tiny-ec", True, "aot_eager", True),
    ("tiny-tc", False, "aot_eager", True),
    ("tiny-diffmoe", False, "aot_eager", True),
])
def test_compiled_blocks_train_like_eager(preset, checkpointing, backend, stats):
    cfg = get_preset(preset, depth=2)
    eager, compiled = build_model(cfg, seed=0), build_model(cfg, seed=0)
    if checkpointing:  # compiled with its block: the threshold EMA still moves once per step
        apply_activation_checkpointing(compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert compile_blocks(compiled, backend=backend) == 2 and compile_blocks(compiled) == 0  # idempotent
    loss_e, grads_e, stats_e, buf_e = _train_step(eager, cfg, stats)
    loss_c, grads_c, stats_c, buf_c = _train_step(compiled, cfg, stats)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path ran (fullgraph: no break)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [s.keys() for s in stats_c] == [s.keys() for s in stats_e]
    for s_c, s_e in zip(stats_c, stats_e):
        for key in s_e:
            torch.testing.assert_close(s_c[key].float(), s_e[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    for name in buf_e:  # threshold EMA and its update count
        torch.testing.assert_close(buf_c[name], buf_e[name], rtol=1e-5, atol=1e-6, msg=name)

