"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 gloo processes equals single-process training; a DP-2 checkpoint
resumes at DP 1 through DeepSpeed's universal checkpoint.

Reference (in the test process, no DeepSpeed): torch AdamW on the same initial weights; each step's
loss is the mean of the two ranks' flow losses (per-rank batches and per-rank noise generators), with
the same gradient clipping. DeepSpeed at DP 2 trains STEPS steps (loss = mean over ranks), saves, and
the checkpoint is converted with `ds_to_universal`; one process then loads it at DP 1 with gradient
accumulation 2 (micro batches = the two ranks' batches) and trains one more step, which must match
the reference's next step: weights, optimizer moments and loss all carried over.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist

from tests.parallel.helpers import spawn

pytestmark = pytest.mark.distributed

WORLD, STEPS, MICRO, LR, CLIP = 2, 3, 2, 1e-2, 1.0
STAGES = (2, 3)
# Adam's eps large enough that the update depends on the gradient's scale (a gradient summed instead of
# averaged over ranks would show) and fp32 roundoff of near-zero gradients is not amplified to ~lr.
EPS = 0.1
LOSS_TOL = dict(rtol=2e-6, atol=1e-7)  # float32 (passes at rtol=1e-6)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-7)  # passes at rtol=1e-6, atol=1e-8


def _weights(state: dict) -> dict:
    """A state dict without the routers' threshold statistics: EMAs of observed cut-offs, not trained
    weights (the reference sees the ranks' batches one after the other, so its EMA differs by design)."""
    return {k: v.detach().clone() for k, v in state.items() if not k.endswith(("threshold_E", "threshold_updates"))}


def _model():
    from tests.model.helpers import tiny_model
    # Per-sample routing groups: a rank's routing does not depend on the other rank's images.
    model, cfg = tiny_model("tiny-ec", seed=0, dtype=torch.float32, moe=dict(group="sample"))
    return model, cfg


def _batch(cfg, rank, step):
    from tests.model.helpers import tiny_batch
    x, _, ctx, mask = tiny_batch(cfg, MICRO, seed=1000 * step + rank, dtype=torch.float32)
    return x, ctx, mask, torch.Generator().manual_seed(7 + 1000 * step + rank)


def _reference(steps):
    from model.flow import FlowConfig, flow_loss
    model, cfg = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = 0.0
        for r in range(WORLD):
            x, ctx, mask, g = _batch(cfg, r, step)
            loss = loss + flow_loss(model, x, ctx, mask, FlowConfig(), generator=g)["loss"] / WORLD
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, _weights(model.state_dict())


def _micro_step(engine, x, ctx, mask, g):
    """The trainer's DeepSpeed micro-step (parallel/deepspeed.py micro_step) on one batch; its loss."""
    from model.flow import FlowConfig, flow_loss
    from parallel.deepspeed import micro_step
    loss = flow_loss(engine, x, ctx, mask, FlowConfig(), generator=g)["loss"]
    assert micro_step(engine, loss)
    return loss.detach().clone()


def _init(rank, world, init_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _full_weights(engine, stage):
    """Full fp32 weights of the engine's module (gathered under ZeRO-3)."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return _weights(engine.module.state_dict())


def _train_dp2(rank, tmp, stages):
    _init(rank, WORLD, f"{tmp}/init2")
    try:
        for stage in stages:
            _train_dp2_stage(rank, f"{tmp}/zero{stage}", stage)
        dist.barrier()  # all ranks done before teardown
    finally:
        dist.destroy_process_group()


def _train_dp2_stage(rank, tmp, stage):
    os.makedirs(tmp, exist_ok=True)
    from parallel.deepspeed import build_engine, ds_config, save
    model, cfg = _model()
    engine = build_engine(model, ds_config(stage, micro_batch=MICRO, lr=LR, eps=EPS, grad_clip=CLIP))
    losses = []
    for step in range(STEPS):
        x, ctx, mask, g = _batch(cfg, rank, step)
        loss = _micro_step(engine, x, ctx, mask, g)
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
    save(engine, f"{tmp}/ckpt", tag="step3")
    weights = _full_weights(engine, stage)
    if rank == 0:
        with open(f"{tmp}/dp2_losses.json", "w") as f:
            json.dump(losses, f)
        torch.save(weights, f"{tmp}/dp2_weights.pt")


def _resume_dp1(rank, tmp, stages):
    _init(0, 1, f"{tmp}/init1")
    try:
        for stage in stages:
            _resume_dp1_stage(f"{tmp}/zero{stage}", stage)
    finally:
        dist.destroy_process_group()


def _resume_dp1_stage(tmp, stage):
    from parallel.deepspeed import build_engine, ds_config
    model, cfg = _model()
    torch.nn.init.zeros_(next(model.parameters()))  # loaded weights must come from the checkpoint
    engine = build_engine(model, ds_config(stage, micro_batch=MICRO, grad_accum=WORLD, lr=LR, eps=EPS,
                                           grad_clip=CLIP, load_universal=True))
    engine.load_checkpoint(f"{tmp}/universal", tag="step3")
    torch.save(_full_weights(engine, stage), f"{tmp}/dp1_loaded.pt")
    loss = 0.0
    for r in range(WORLD):  # the two DP-2 ranks' batches as two accumulation micro-steps
        x, ctx, mask, g = _batch(cfg, r, STEPS)
        loss += _micro_step(engine, x, ctx, mask, g).item() / WORLD
    torch.save({"loss": loss, "weights": _full_weights(engine, stage)}, f"{tmp}/dp1_step4.pt")


def test_zero2_zero3_match_single_process_and_reshard_to_dp1(tmp_path):
    """ZeRO-2 and ZeRO-3 one after the other in the same processes (start-up is paid once)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    ref_losses, ref_weights = _reference(STEPS + 1)
    _, ref3 = _reference(STEPS)
    spawn(_train_dp2, (str(tmp_path), STAGES), WORLD)
    for stage in STAGES:
        _convert_and_check_dp2(tmp_path / f"zero{stage}", ref_losses, ref3)
    spawn(_resume_dp1, (str(tmp_path), STAGES), 1)
    for stage in STAGES:
        _check_dp1(tmp_path / f"zero{stage}", ref_losses, ref_weights)


def _convert_and_check_dp2(tmp_path, ref_losses, ref3):
    dp2_losses = json.loads((tmp_path / "dp2_losses.json").read_text())
    torch.testing.assert_close(torch.tensor(dp2_losses, dtype=torch.float64),
                               torch.tensor(ref_losses[:STEPS], dtype=torch.float64), **LOSS_TOL, msg=lambda m: f"{tmp_path.name} {m}")
    assert len(set(dp2_losses)) == STEPS  # it trains: the loss changes every step

    from parallel.deepspeed import load_fp32_weights, to_universal
    to_universal(tmp_path / "ckpt", tmp_path / "universal", tag="step3")
    dp2_weights = torch.load(tmp_path / "dp2_weights.pt", weights_only=True)
    for k, v in ref3.items():
        torch.testing.assert_close(dp2_weights[k], v, **WEIGHT_TOL, msg=lambda m: f"{tmp_path.name} {k} {m}")
    # Route 2: consolidated fp32 weights into a plain model equal the DP-2 engine's weights exactly.
    plain, _ = _model()
    load_fp32_weights(plain, tmp_path / "ckpt", tag="step3")
    for k, v in _weights(plain.state_dict()).items():
        assert torch.equal(v, dp2_weights[k]), f"{tmp_path.name} {k}"


def _check_dp1(tmp_path, ref_losses, ref_weights):
    dp2_weights = torch.load(tmp_path / "dp2_weights.pt", weights_only=True)
    loaded = torch.load(tmp_path / "dp1_loaded.pt", weights_only=True)
    for k, v in dp2_weights.items():
        assert torch.equal(loaded[k], v), f"{tmp_path.name}: universal load at DP 1 changed {k}"
    resumed = torch.load(tmp_path / "dp1_step4.pt", weights_only=True)
    assert resumed["loss"] == pytest.approx(ref_losses[STEPS], rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])
    moved = max((resumed["weights"][k] - v).abs().max().item() for k, v in dp2_weights.items())
    assert moved > 1e-4, "the resumed step did not update the weights"
    for k, v in ref_weights.items():  # optimizer moments carried over: the 4th update matches
        torch.testing.assert_close(resumed["weights"][k], v, **WEIGHT_TOL,
                                   msg=lambda m: f"{tmp_path.name} {k} {m}")


def test_config_names_bad_values():
    from parallel.deepspeed import ds_config
    with pytest.raises(ValueError, match="stage=1"):
        ds_config(stage=1)
    with pytest.raises(ValueError, match="micro_batch=0"):
        ds_config(micro_batch=0)
    cfg = ds_config(stage=3, micro_batch=2, grad_accum=4, lr=3e-4, bf16=True, grad_clip=None)
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 0.0
