"""torch.compile of each DiT block, applied from outside the model (after activation checkpointing,
before FSDP, as torchtitan does).

Each block's `forward` is replaced in place by its compiled version, so module names, parameter FQNs,
checkpoints and hooks (FSDP's run eagerly around the compiled forward) are unchanged. Blocks of one
kind share the compiled code; `dynamic=False` keeps every shape static (expert choice has static
shapes: every expert takes exactly C tokens per group, so X, the slot count, is a constant).

With `fullgraph=True` (the default) a block is one graph, or compilation fails. What traces as one
graph, forward and backward (training checked on CPU by tests/parallel/test_compile.py):
  * dense blocks;
  * expert choice, token choice (GShard capacity slots) and DiffMoE (batch pool + capacity predictor)
    in training (the threshold EMA's buffer update included, routing statistics on or off), and in eval
    with a fixed group mode ("tokens", "sample", "batch"), with or without an expert-load meter
    (compiled sampling: tests/train/test_sample.py);
  * activation checkpointing applied before compile (the checkpoint is traced into the graph and the
    threshold update runs once per step).
What breaks the graph (so needs `fullgraph=False`, or stays eager):
  * "dynamic" inference routing: each expert's token count depends on the data, the plan is padded to
    the busiest expert (`int(...)`, a host sync) and its shape changes from step to step;
  * the megatron-core dispatcher: it turns the tokens-per-expert counts into Python lists (host sync);
  * DeepSpeed: the engine wraps and hooks the module itself (train.compile is refused there);
  * expert parallelism (train.compile is refused with parallel.ep > 1): the sharded expert weights are
    DTensors on the "ep" mesh, multiplied with plain tensors inside the block, and the experts are their
    own FSDP unit, whose hooks dynamo does not trace (measured on 2 CPU processes: fullgraph fails at
    the hook, fullgraph=False at the mixed DTensor bmm);
  * not checked compiled (several processes): the routing pool across ranks (parallel/routing_pool.py)
    uses in-place c10d collectives, which dynamo remaps to functional ones where it can.
Compiling before activation checkpointing would rerun the compiled forward, threshold update included,
in the recomputation: keep the order of `parallel.parallelize`.
"""

from __future__ import annotations

import torch
from torch import nn

from model.dit import DiT

# Distinct (block kind, mode, shape) entries per code object: dense and MoE blocks, train / eval,
# statistics on / off, and the few batch shapes of sampling.
RECOMPILE_LIMIT = 64


def compile_module_forward(module: nn.Module, fullgraph: bool = True, backend: str = "inductor") -> bool:
    """Replace `module.forward` by its compiled version (once); False if it was already compiled."""
    if getattr(module, "_ecdit_compiled", False):
        return False
    module.forward = torch.compile(module.forward, fullgraph=fullgraph, dynamic=False, backend=backend)
    module._ecdit_compiled = True
    return True


def compile_blocks(model: DiT, fullgraph: bool = True, backend: str = "inductor") -> int:
    """Compile every block of `model` (the checkpoint wrapper, if any, with its block); idempotent.
    Returns how many blocks were compiled now. `backend="aot_eager"` traces the same graphs (forward and
    backward) without generating kernels: a fast check that a block is one graph."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return sum(compile_module_forward(blk, fullgraph, backend) for blk in model.blocks)
