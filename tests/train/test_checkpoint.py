"""Sharded checkpoints: reshard across world/EP sizes, atomic publish under SIGKILL, exact resume,
safetensors export, keep-last-N, async save."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from tests.parallel.helpers import batch_loss, rank_batch, reference_loss, run_workers

ROOT = Path(__file__).resolve().parents[2]


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _model_and_opt(seed, world, ep):
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import parallelize
    from tests.model.helpers import tiny_model
    model, cfg = tiny_model("tiny-ec", seed=seed, moe=dict(group="tokens", group_size=32, inference_group="sample"))
    if world > 1:
        pcfg = ParallelConfig(ep=ep).resolved(world, cfg.moe.num_experts)
        parallelize(model, build_mesh(pcfg, world), pcfg)
    return model, cfg, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _eval_out(model, cfg):
    from tests.model.helpers import tiny_batch
    x, t, ctx, mask = tiny_batch(cfg, 3, seed=99)
    model.eval()
    with torch.no_grad():
        out = model(x, t, ctx, mask).pred
    model.train()
    return out


def _global_step(model, opt, cfg, rank, world, step, saved_world=2):
    """One optimizer step on the global batch of the saving run (saved_world local batches)."""
    if world == 1:
        loss = reference_loss(model, cfg, saved_world, step=step)[0]
    else:
        loss = batch_loss(model, rank_batch(cfg, rank, step=step))[0]
    opt.zero_grad()
    loss.backward()
    opt.step()


def _full_params(model):
    return {k: full(v.data).detach().clone() for k, v in model.named_parameters()}


def _save_worker(rank, world, root):
    from train.checkpoint import Checkpointer, capture_rng
    from train.weights import export_safetensors
    model, cfg, opt = _model_and_opt(0, world, ep=2)
    for step in range(2):
        _global_step(model, opt, cfg, rank, world, step)
    ck = Checkpointer(Path(root) / "ckpt", keep_last=2)
    ck.save(2, model, opt, train_state={"step": 2, "rank": rank, "rng": capture_rng()}, config={"note": "test"})
    weights, out = _full_params(model), _eval_out(model, cfg)
    export_safetensors(model, Path(root) / "export")
    _global_step(model, opt, cfg, rank, world, 2)
    after = _full_params(model)
    if rank == 0:
        save_file(weights, f"{root}/weights.safetensors")
        save_file(after, f"{root}/after.safetensors")
        save_file({"out": out}, f"{root}/out.safetensors")


def _check_loaded(model, cfg, root, rank):
    weights = load_file(f"{root}/weights.safetensors")
    E = cfg.moe.num_experts
    n_expert_checks = 0
    for name, p in model.named_parameters():
        got, want = full(p.data), weights[name]
        if ".experts." in name:  # every expert, one by one (DCP silently overwrites non-DTensor shards)
            for e in range(E):
                assert torch.equal(got[e], want[e]), (name, e)
                n_expert_checks += 1
        else:
            assert torch.equal(got, want), name
    assert n_expert_checks == cfg.num_moe_blocks * 4 * E  # w1, b1, w2, b2
    torch.testing.assert_close(_eval_out(model, cfg), load_file(f"{root}/out.safetensors")["out"],
                               rtol=1e-12, atol=1e-12)


def _load_worker(rank, world, root, ep):
    from train.checkpoint import Checkpointer
    model, cfg, opt = _model_and_opt(7, world, ep=ep)  # other weights: the load must replace them
    ck = Checkpointer(Path(root) / "ckpt")
    state = ck.load(ck.latest(), model, opt)
    if world == 2:
        assert state["step"] == 2 and state["rank"] == rank
    else:
        assert state is None  # per-rank train state does not carry over to another world size
    _check_loaded(model, cfg, root, rank)
    if world <= 2:  # same global batch and routing groups as the saving run: the next step matches
        _global_step(model, opt, cfg, rank, world, 2)
        after = load_file(f"{root}/after.safetensors")
        for name, p in model.named_parameters():
            torch.testing.assert_close(full(p.data), after[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.distributed
def test_save_at_2_ranks_load_at_1_2_and_4_ranks(tmp_path):
    run_workers(_save_worker, 2, tmp_path, str(tmp_path))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000002"]
    assert json.loads((tmp_path / "ckpt/step_00000002/config.json").read_text()) == {"note": "test"}
    _load_worker(0, 1, str(tmp_path), ep=1)  # one process, no EP, plain tensors
    run_workers(_load_worker, 2, tmp_path / "w2", str(tmp_path), 2)
    run_workers(_load_worker, 4, tmp_path / "w4", str(tmp_path), 4)  # EP 4: one expert per rank
    # The consolidated safetensors export of the sharded model loads back in one process.
    from train.weights import load_exported
    model = load_exported(tmp_path / "export")
    weights = load_file(f"{tmp_path}/weights.safetensors")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p.data, weights[name]), name


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint as dcp
    from model.config import get_preset
    from model.dit import build_model
    from train.checkpoint import Checkpointer
    root, marker = sys.argv[1], sys.argv[2]
    model = build_model(get_preset("tiny-ec"), seed=0)
    ck = Checkpointer(root)
    ck.save(1, model)
    original = dcp.FileSystemWriter.write_data
    def write_then_hang(self, plan, planner):
        fut = original(self, plan, planner)
        fut.wait()
        open(marker, "w").close()  # shards written, metadata and publish not yet
        time.sleep(120)
        return fut
    dcp.FileSystemWriter.write_data = write_then_hang
    with torch.no_grad():
        model.blocks[0].attn.q.weight.add_(1.0)
    ck.save(2, model)
""")


def test_sigkill_mid_save_leaves_the_last_checkpoint_loadable(tmp_path):
    from model.config import get_preset
    from model.dit import build_model
    from train.checkpoint import Checkpointer
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "ckpt"), str(marker)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "child died before the second save"
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "ckpt" / ".tmp-step_00000002").exists()  # the half-written save
    ck = Checkpointer(tmp_path / "ckpt")
    assert [p.name for p in ck.checkpoints()] == ["step_00000001"]
    assert not (tmp_path / "ckpt" / ".tmp-step_00000002").exists()  # cleaned up
    model = build_model(get_preset("tiny-ec"), seed=5)
    ck.load(ck.latest(), model)
    ref = build_model(get_preset("tiny-ec"), seed=0)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name


def _train(model, opt, sched, cfg, steps, start=0, ck=None, save_at=None):
    from model.flow import FlowConfig, flow_loss
    from tests.model.helpers import tiny_batch
    losses = []
    for step in range(start, steps):
        x, _, ctx, mask = tiny_batch(cfg, 4, seed=step, dtype=torch.float32)  # data position = step
        out = flow_loss(model, x, ctx, mask, FlowConfig(), collect_stats=False)  # global torch RNG
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        losses.append(out["loss"].item())
        if ck is not None and step + 1 == save_at:
            from train.checkpoint import capture_rng
            ck.save(step + 1, model, opt, train_state={"step": step + 1, "rng": capture_rng(),
                                                        "sched": sched.state_dict()})
            return losses
    return losses


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, async_save):
    from model.config import get_preset
    from model.dit import build_model
    from train.checkpoint import Checkpointer, restore_rng

    cfg = get_preset("tiny-ec")

    def fresh(seed):
        torch.manual_seed(seed)
        m = build_model(cfg, seed=seed)
        o = torch.optim.AdamW(m.parameters(), lr=3e-3)
        return m, o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4))

    m, o, s = fresh(0)
    straight = _train(m, o, s, cfg, 8)
    m, o, s = fresh(0)
    ck = Checkpointer(tmp_path, async_save=async_save)
    first = _train(m, o, s, cfg, 8, ck=ck, save_at=5)
    ck.wait()
    torch.manual_seed(123)  # a restarted process: different RNG, weights, optimizer
    m, o, s = fresh(1)
    state = ck.load(ck.latest(), m, o)
    restore_rng(state["rng"])
    s.load_state_dict(state["sched"])
    rest = _train(m, o, s, cfg, 8, start=state["step"])
    assert first + rest == straight  # bit-exact


def test_keep_last_n_and_incomplete_checkpoints_are_refused(tmp_path):
    from model.config import get_preset
    from model.dit import build_model
    from train.checkpoint import Checkpointer
    model = build_model(get_preset("tiny-dense"), seed=0)
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ck.save(step, model)
    assert [p.name for p in ck.checkpoints()] == ["step_00000020", "step_00000030"]
    (tmp_path / "step_00000040").mkdir()  # no meta.json: not a checkpoint
    assert ck.latest().name == "step_00000030"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.load(tmp_path / "step_00000040", model)
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
