"""Every trainer option through `python -m train`, each checked by a value: gradient accumulation equals the
large batch, RMSProp's update and the cosine schedule's lr, async checkpoints equal sync ones, bf16 autocast
stays close to fp32, meta init equals eager init, `train.resume=<step dir>` (and one that is not), the
non-finite-loss stop and the EMA (a hand-computed EMA of the saved raw weights, across a resume, and switched
on at a resume)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env, losses, shapes, train  # noqa: E402,F401

from model.config import config_from_dict  # noqa: E402
from model.dit import build_model  # noqa: E402

BASE = [*BASE, "train.wandb_mode=disabled"]  # no test here reads the wandb files

EMA_DECAY = 0.75  # not 0.5, so that swapping the EMA's two weights changes it
ARGS = [*BASE, "train.ckpt_every=1", "train.keep_last=10", f"train.ema_decay={EMA_DECAY}", "optim.lr=1e-3",
        "optim.warmup_steps=0"]
# Measured over these 4 steps: bf16 autocast losses within 2.1e-4 (relative) of fp32, gradient norms 1.9e-3.
BF16_LOSS_REL, BF16_NORM_REL = 2e-3, 2e-2


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _flat(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree}


def saved(ckpt: Path, tmp_path: Path) -> dict:
    """Everything a DCP step checkpoint holds, flattened: "model/<fqn>", "ema/<fqn>", "optim/state/<fqn>/<key>"."""
    out = tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return _flat(torch.load(out, weights_only=False))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The step-0 parameters: the model of the run's resolved config, built as the trainer builds it."""
    config = json.loads((_step(run_dir, 1) / "config.json").read_text())
    model = build_model(config_from_dict(config["model_resolved"]), seed=config["train"]["seed"])
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shapes) -> Path:
    """4 steps, fp32, eager init, sync checkpoints at every step, EMA decay 0.75."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    _ok(train([*ARGS, shapes, f"train.run_dir={run}"]))
    return run


def test_grad_accum_equals_the_large_batch(tmp_path, shapes):
    """grad_accum=2 x batch 2 == grad_accum=1 x batch 4: the same losses, gradient norms and weights, with
    the flow loss's random draws tied to the samples (tests/train/aligned_flow.py)."""
    def run(name, *extra):
        cmd = [sys.executable, str(ROOT / "tests" / "train" / "aligned_flow.py"), *BASE, shapes, "train.steps=3",
               "train.ckpt_every=1", "optim.lr=1e-3", f"train.run_dir={tmp_path / name}", *extra]
        _ok(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300))
        return _rows(tmp_path / name)

    big = run("big", "data.batch_size=4")
    acc = run("acc", "data.batch_size=2", "train.grad_accum=2")
    assert [r["samples_seen"] for r in acc] == [r["samples_seen"] for r in big] == [4, 8, 12]
    # Measured: the same losses and norms to the bit, weights within 6e-8 after 3 steps.
    assert [r["loss"] for r in acc] == pytest.approx([r["loss"] for r in big], rel=1e-6)
    assert [r["grad_norm"] for r in acc] == pytest.approx([r["grad_norm"] for r in big], rel=1e-5)
    a, b = saved(_step(tmp_path / "acc", 3), tmp_path), saved(_step(tmp_path / "big", 3), tmp_path)
    for k in (k for k in b if k.startswith("model/")):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    w0 = initial_weights(tmp_path / "big")
    assert any(not torch.equal(b[f"model/{n}"], w) for n, w in w0.items())  # the weights did move


def test_rmsprop_update_and_cosine_lr(tmp_path, shapes):
    """optim=rmsprop: the first update is w1 = w0 - lr_1 * momentum_buffer with square_avg = (1 - alpha) g^2;
    the cosine schedule's logged lr (the last update's: update k uses factor(k - 1)) follows the formula."""
    run = tmp_path / "run"
    _ok(train([*BASE, shapes, "optim=rmsprop", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
               "optim.min_lr_ratio=0.1", "train.steps=6", "train.ckpt_every=1", "train.keep_last=10",
               "train.ema_decay=0", f"train.run_dir={run}"]))
    rows = _rows(run)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in (0.5, 1.0, *cos)], rel=1e-12)
    w0, s1 = initial_weights(run), saved(_step(run, 1), tmp_path)
    assert not any(k.endswith("/exp_avg") for k in s1)  # not AdamW's state
    for name, w in w0.items():
        buf, sq = s1[f"optim/state/{name}/momentum_buffer"], s1[f"optim/state/{name}/square_avg"]
        torch.testing.assert_close(s1[f"model/{name}"], w - 0.5e-3 * buf, rtol=1e-6, atol=1e-9, msg=name)
        grad = buf * (sq.sqrt() + 1e-8)  # RMSProp with momentum, first step: buf = g / (sqrt(sq) + eps)
        torch.testing.assert_close(sq, (1 - 0.99) * grad ** 2, rtol=1e-4, atol=1e-12, msg=name)


def test_async_checkpoints_equal_sync_ones(tmp_path, baseline, shapes):
    run = tmp_path / "run"
    _ok(train([*ARGS, shapes, "train.async_ckpt=true", f"train.run_dir={run}"]))
    for step in range(1, 5):  # model, optimizer and EMA, tensor for tensor
        assert_same(saved(_step(run, step), tmp_path), saved(_step(baseline, step), tmp_path))


def test_bf16_autocast_is_close_to_fp32(tmp_path, baseline, shapes):
    run = tmp_path / "run"
    _ok(train([*ARGS, shapes, "train.precision=bf16", f"train.run_dir={run}"]))
    bf16, fp32 = _rows(run), _rows(baseline)
    assert bf16[0]["loss"] == fp32[0]["loss"]  # the zero-initialised final layer predicts 0 in any dtype
    assert all(b["loss"] != f["loss"] for b, f in zip(bf16[1:], fp32[1:]))  # autocast did run
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=BF16_LOSS_REL)
    assert [r["grad_norm"] for r in bf16] == pytest.approx([r["grad_norm"] for r in fp32], rel=BF16_NORM_REL)


def test_meta_init_equals_eager_init(tmp_path, baseline, shapes):
    run = tmp_path / "run"
    _ok(train([*ARGS, shapes, "train.meta_init=true", "train.steps=1", f"train.run_dir={run}"]))
    assert losses(run)[1] == losses(baseline)[1]
    assert_same(saved(_step(run, 1), tmp_path), saved(_step(baseline, 1), tmp_path))


def test_resume_from_a_step_dir_not_the_latest(tmp_path, baseline, shapes):
    """train.resume=<step_2> in a run whose latest checkpoint is step 4 trains steps 3 and 4 again, to the
    same losses, weights, optimizer state and EMA."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    proc = _ok(train([*ARGS, shapes, f"train.resume={_step(run, 2)}", f"train.run_dir={run}"]))
    assert f"resumed from {_step(run, 2)} at step 2" in proc.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]
    assert [r["loss"] for r in rows[4:]] == [r["loss"] for r in rows[2:4]]
    assert_same(saved(_step(run, 4), tmp_path), saved(_step(baseline, 4), tmp_path))


def test_resume_from_a_path_without_a_checkpoint_fails_naming_the_field(tmp_path, baseline, shapes):
    path = baseline / "checkpoints"  # the root, not a step dir
    proc = train([*ARGS, shapes, f"train.resume={path}", f"train.run_dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: train.resume='{path}' must be auto, none or a complete step_* checkpoint directory (it has no "
        "meta.json)")


def test_ema_equals_the_hand_computed_ema(tmp_path, baseline):
    """ema_0 = w_0 (the initial weights), ema_k = decay * ema_{k-1} + (1 - decay) * w_k after update k."""
    ema = initial_weights(baseline)
    for step in range(1, 5):
        s = saved(_step(baseline, step), tmp_path)
        assert {k[4:] for k in s if k.startswith("ema/")} == set(ema)
        for name in ema:
            ema[name] = EMA_DECAY * ema[name] + (1 - EMA_DECAY) * s[f"model/{name}"]
            torch.testing.assert_close(s[f"ema/{name}"], ema[name], rtol=1e-6, atol=1e-8, msg=f"{step} {name}")
    assert not torch.equal(s["ema/blocks.0.attn.q.weight"], s["model/blocks.0.attn.q.weight"])


def test_ema_switched_on_at_a_resume_starts_from_the_resumed_weights(tmp_path, shapes):
    """A checkpoint without EMA (train.ema_decay=0) resumed with train.ema_decay=0.75: ema_1 = w_1, then the
    update rule."""
    run = tmp_path / "run"
    _ok(train([*ARGS, shapes, "train.ema_decay=0", "train.steps=1", f"train.run_dir={run}"]))
    _ok(train([*ARGS, shapes, "train.steps=2", f"train.run_dir={run}"]))
    s1, s2 = saved(_step(run, 1), tmp_path), saved(_step(run, 2), tmp_path)
    assert not any(k.startswith("ema/") for k in s1)
    for name in (k[6:] for k in s1 if k.startswith("model/") and f"ema/{k[6:]}" in s2):
        want = EMA_DECAY * s1[f"model/{name}"] + (1 - EMA_DECAY) * s2[f"model/{name}"]
        torch.testing.assert_close(s2[f"ema/{name}"], want, rtol=1e-6, atol=1e-8, msg=name)
    assert {k[4:] for k in s2 if k.startswith("ema/")} == set(initial_weights(run))


def test_non_finite_losses_stop_naming_max_nan_steps(tmp_path, shapes):
    """optim.lr=1e30 without clipping: the weights blow up after one update, the next two losses are not
    finite, and the run stops with one error line, exit code 2, naming the last checkpoint (step 2, an async
    save still pending when the stop came)."""
    run = tmp_path / "run"
    proc = train([*BASE, shapes, "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0", "train.async_ckpt=true",
                  "train.max_nan_steps=2", "train.steps=6", f"train.run_dir={run}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert errors[-1] == ("error: 2 non-finite losses in a row (train.max_nan_steps=2); last good checkpoint: "
                          f"{_step(run, 2)}"), errors[-3:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert sum(line.startswith("error:") for line in errors) == 1
    assert "step 2: non-finite loss, update skipped (1 in a row)" in proc.stdout
    assert "step 3: non-finite loss, update skipped (2 in a row)" in proc.stdout
    assert list(losses(run)) == [1]  # only the finite step is logged
