"""The torch engine and DeepSpeed ZeRO-2 on the same config: the same learning rate at every update
(one schedule, train/backends.py lr_schedule) and the same losses within float tolerance; on 2
processes with expert parallelism 2, gradient accumulation and an EMA, also the same gradient norms and
the same raw and EMA weights as loaded for inference (train/inference_model.py load_model); ZeRO-3 with
the default EMA and ZeRO-2 on 2 processes: the same losses and the same raw and EMA weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env, shapes  # noqa: E402,F401

ARGS = [*BASE, "train.wandb_mode=disabled", "train.steps=5", "optim.warmup_steps=3", "optim.lr=3e-4",
        "model.moe.num_experts=4"]


def _train(parallel: str, run_dir: Path, shapes_arg: str, procs: int = 1, extra: tuple = ()) -> str:
    """`python -m train` under torchrun; its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "train",
           *ARGS, shapes_arg, f"parallel={parallel}", f"train.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(run_dir: Path) -> list[dict]:
    """A run's logged metrics rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(parallel: str, run_dir: Path, shapes_arg: str, procs: int = 1, extra: tuple = ()) -> list[dict]:
    """`_train`'s logged metrics rows."""
    _train(parallel, run_dir, shapes_arg, procs, extra)
    return _rows(run_dir)


@pytest.mark.distributed
def test_torch_and_deepspeed_engines_agree(tmp_path, shapes):
    torch_rows = _run("single", tmp_path / "torch", shapes)
    ds_rows = _run("deepspeed_zero2", tmp_path / "ds", shapes)
    expected = [3e-4 * min(1.0, s / 3) for s in range(1, 6)]  # update k uses lr * k / warmup
    assert [r["lr"] for r in torch_rows] == pytest.approx(expected, rel=1e-9)
    assert [r["lr"] for r in ds_rows] == pytest.approx(expected, rel=1e-9)
    assert [r["loss"] for r in ds_rows] == pytest.approx([r["loss"] for r in torch_rows], rel=1e-4)
    assert [r["grad_norm"] for r in ds_rows] == pytest.approx([r["grad_norm"] for r in torch_rows], rel=1e-3)


@pytest.mark.distributed
def test_torch_and_deepspeed_engines_agree_with_expert_parallelism(tmp_path, shapes):
    import torch

    from train.inference_model import load_model
    extra = ("train.grad_accum=2", "train.ema_decay=0.9", "train.sample_every=0")
    torch_rows = _run("fsdp_ep", tmp_path / "torch", shapes, procs=2, extra=extra)
    ds_rows = _run("deepspeed_zero2", tmp_path / "ds", shapes, procs=2, extra=(*extra, "parallel.ep=2"))
    for key in ("loss", "grad_norm", "lr"):  # measured: within 2e-7 relative
        assert [r[key] for r in ds_rows] == pytest.approx([r[key] for r in torch_rows], rel=1e-6), key
    for weights in ("ema", "raw"):
        ref = load_model(tmp_path / "torch" / "checkpoints", weights=weights, log=lambda m: None)[0].state_dict()
        got, _, _, used = load_model(tmp_path / "ds" / "checkpoints", weights=weights, log=lambda m: None)
        assert used == weights
        for k, v in got.state_dict().items():  # measured: within 1e-8
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{weights} {k}: {m}")


@pytest.mark.distributed
def test_deepspeed_zero3_with_the_default_ema_agrees_with_zero2(tmp_path, shapes):
    """train.ema_decay as configured (train/cpu.yaml): ZeRO-3 trains, its replica check passes (its
    partitions are unique per rank), and its losses and raw and EMA weights are ZeRO-2's."""
    import torch

    from bench.config_matrix import REPLICAS_OK
    from train.inference_model import load_model
    extra = ("train.sample_every=0", "parallel.ep=1")
    assert f"[train] {REPLICAS_OK}" in _train("deepspeed_zero3", tmp_path / "zero3", shapes, procs=2, extra=extra)
    zero3 = _rows(tmp_path / "zero3")
    zero2 = _run("deepspeed_zero2", tmp_path / "zero2", shapes, procs=2, extra=extra)
    for key in ("loss", "grad_norm", "lr"):  # measured: losses equal, gradient norms within 8e-8 relative
        assert [r[key] for r in zero3] == pytest.approx([r[key] for r in zero2], rel=1e-6), key
    models = {}
    for weights in ("ema", "raw"):
        ref = load_model(tmp_path / "zero2" / "checkpoints", weights=weights, log=lambda m: None)[0].state_dict()
        got, _, _, used = load_model(tmp_path / "zero3" / "checkpoints", weights=weights, log=lambda m: None)
        assert used == weights
        models[weights] = got.state_dict()
        for k, v in models[weights].items():  # measured: EMA within 8e-9, raw within 6e-8
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{weights} {k}: {m}")
    assert any(not torch.equal(v, models["raw"][k]) for k, v in models["ema"].items())
