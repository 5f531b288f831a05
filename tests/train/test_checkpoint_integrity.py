"""Checkpoints that prove they are whole: meta.json records every file's size and CRC-32 at save (hashed
across the ranks, both engines); a truncated, altered or lost file is named by `verify` on every rank;
train.resume=auto falls back from a damaged newest checkpoint to the previous whole one with one line and
continues exactly; a damaged train.resume path, or no whole checkpoint at all, stops with one error line."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.parallel.helpers import run_workers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_app import BASE, _env, losses, shapes  # noqa: E402,F401

ARGS = [*BASE, "parallel=fsdp_ep", "train.steps=12", "train.ckpt_every=4", "train.log_every=1", "train.keep_last=3",
        "train.sample_every=0"]


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shapes) -> Path:
    """An uninterrupted 12-step run on 2 ranks (FSDP2 + expert parallelism 2), checkpoints at 4, 8, 12."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = _torchrun([*ARGS, shapes, f"train.run_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy(step_dir: Path, dest_root: Path) -> Path:
    dest_root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(step_dir, dest_root / step_dir.name))


def _largest_distcp(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _truncate_half(file: Path) -> tuple[int, int]:
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    return size // 2, size


@pytest.mark.distributed
def test_meta_records_every_file_with_its_size_and_crc(straight):
    from train.checkpoint import verify
    from train.rundir import checkpoint_files
    for step in (4, 8, 12):
        ckpt = straight / "checkpoints" / f"step_{step:08d}"
        files = json.loads((ckpt / "meta.json").read_text())["files"]
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        assert sorted(files) == checkpoint_files(ckpt) == [f for f in on_disk if f != "meta.json"]  # no parts left
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "train/rank00000.json",
                "train/rank00001.json"} <= set(files)
        for rel, (size, crc) in files.items():
            data = (ckpt / rel).read_bytes()
            assert [size, crc] == [len(data), zlib.crc32(data)], rel
        assert verify(ckpt) is None


def _damage(ckpt: Path, how: str) -> str:
    """Damage a copied checkpoint; the reason `verify` must give."""
    if how == "truncate":
        half, size = _truncate_half(ckpt / "__1_0.distcp")
        return f"__1_0.distcp: {half} bytes, {size} recorded"
    if how == "flip":
        data = bytearray((ckpt / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0x01
        (ckpt / "__0_0.distcp").write_bytes(bytes(data))
        return "__0_0.distcp: checksum differs from the one recorded at save"
    if how == "delete":
        (ckpt / "train" / "rank00001.json").unlink()
        return "train/rank00001.json: missing or unreadable"
    if how == "meta":
        (ckpt / "meta.json").write_text('{"step": 8, "files": {"__0_0.di')
        return "meta.json: unreadable, not JSON, or its file record is malformed"
    if how == "no-meta":
        (ckpt / "meta.json").unlink()
        return "meta.json: missing"
    raise ValueError(how)


HOWS = ("truncate", "flip", "delete", "meta", "no-meta")


def _verify_worker(rank, world, root):
    from train.checkpoint import verify
    expected = json.loads((Path(root) / "expected.json").read_text())
    got = {name: verify(Path(root) / name) for name in expected}
    assert got == expected, (rank, got)


@pytest.mark.distributed
def test_damage_is_named_by_every_rank(straight, tmp_path):
    """Each damage, on one process and on two (the damaged file in either rank's slice); an undamaged copy
    and a checkpoint without a file record (saved before files were recorded) are accepted."""
    from train.checkpoint import verify
    source = straight / "checkpoints" / "step_00000008"
    expected = {}
    for how in HOWS:
        ckpt = _copy(source, tmp_path / how)
        expected[f"{how}/{source.name}"] = _damage(ckpt, how)
    _copy(source, tmp_path / "whole")
    expected[f"whole/{source.name}"] = None
    legacy = _copy(source, tmp_path / "legacy")
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["files"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    (legacy / "__0_0.distcp").write_bytes(b"")  # not recorded: not checked
    expected[f"legacy/{source.name}"] = None
    for name, reason in expected.items():
        assert verify(tmp_path / name) == reason, name
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    run_workers(_verify_worker, 2, tmp_path / "pg", str(tmp_path))


@pytest.mark.distributed
def test_auto_resume_falls_back_to_the_previous_whole_checkpoint(straight, tmp_path, shapes):
    """8 steps saved at 4 and 8 (the uninterrupted run's checkpoints), the largest shard of step 8 cut to
    half: the rerun to 12 steps says so in one line, resumes from step 4, and its losses of steps 5..12 are
    the uninterrupted run's, exactly."""
    run = tmp_path / "run"
    for step in (4, 8):
        _copy(straight / "checkpoints" / f"step_{step:08d}", run / "checkpoints")
    damaged = run / "checkpoints" / "step_00000008"
    shard = _largest_distcp(damaged)
    half, size = _truncate_half(shard)
    proc = _torchrun([*ARGS, shapes, f"train.run_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "damaged" in line]
    assert lines == [f"[train] checkpoint {damaged} is damaged ({shard.name}: {half} bytes, {size} recorded): "
                     f"resuming from {run / 'checkpoints' / 'step_00000004'}"], proc.stdout[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in proc.stdout
    want = {s: v for s, v in losses(straight).items() if s > 4}
    assert sorted(want) == list(range(5, 13))
    assert losses(run) == want
    from train.checkpoint import verify
    assert verify(damaged) is None  # saved again at step 8


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.distributed
def test_a_damaged_checkpoint_is_refused_with_one_line(straight, tmp_path, shapes):
    """train.resume=<damaged path>, and train.resume=auto with no whole checkpoint: exit 2, one `error:`
    line naming the file, nothing trained."""
    damaged = _copy(straight / "checkpoints" / "step_00000008", tmp_path / "only" / "checkpoints")
    shard = _largest_distcp(damaged)
    half, size = _truncate_half(shard)
    reason = f"{shard.name}: {half} bytes, {size} recorded"
    single = [*ARGS, shapes, "parallel=single"]
    proc = subprocess.run([sys.executable, "-m", "train", *single, f"train.run_dir={tmp_path}/explicit",
                           f"train.resume={damaged}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert _one_error_line(proc) == f"error: checkpoint {damaged} is damaged ({reason})"
    assert not (tmp_path / "explicit" / "checkpoints").exists() or not any((tmp_path / "explicit" / "checkpoints").iterdir())
    proc = subprocess.run([sys.executable, "-m", "train", *single, f"train.run_dir={tmp_path}/only"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert _one_error_line(proc) == (f"error: checkpoint {damaged} is damaged ({reason}): no whole checkpoint to "
                                     f"resume from (train.resume=none starts afresh)")
    assert [p.name for p in (tmp_path / "only" / "checkpoints").iterdir()] == ["step_00000008"]


def _deepspeed_worker(rank, world, root):
    import torch
    import torch.distributed as dist

    from parallel.deepspeed import ds_config
    from tests.model.helpers import tiny_model
    from train.backends import DeepSpeedBackend
    from train.checkpoint import verify
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    model, _ = tiny_model("tiny-ec", seed=0, dtype=torch.float32, moe=dict(group="sample"))
    backend = DeepSpeedBackend(model, ds_config(2, micro_batch=2), Path(root), keep_last=2, schedule=None)
    backend.save(1, {"step": 1, "rank": rank}, {"note": "test"})
    ckpt = Path(root) / "step_00000001"
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    assert f"train/rank{rank:05d}.json" in files and "config.json" in files and len(files) > 3
    for rel, (size, crc) in files.items():
        data = (ckpt / rel).read_bytes()
        assert [size, crc] == [len(data), zlib.crc32(data)], rel
    assert verify(ckpt) is None
    dist.barrier()
    if rank == 0:
        (ckpt / "train" / "rank00001.json").write_text("{}")
    dist.barrier()
    assert verify(ckpt) == f"train/rank00001.json: 2 bytes, {files['train/rank00001.json'][0]} recorded"


@pytest.mark.distributed
def test_deepspeed_engine_records_its_files(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_workers(_deepspeed_worker, 2, tmp_path / "pg", str(tmp_path / "ckpt"))


@pytest.mark.distributed
def test_inference_loads_only_a_whole_checkpoint(straight, tmp_path):
    """train.sample, train.evaluate and train.export load through train/inference_model.py load_model: a
    damaged step is refused with the damage named (given itself, or as the newest under a checkpoint root),
    and the CLI says so in one line; the same checkpoint loads once it is whole again."""
    from train.generate import SampleError
    from train.inference_model import load_model
    root = tmp_path / "checkpoints"
    for step in (8, 12):
        _copy(straight / "checkpoints" / f"step_{step:08d}", root)
    newest = root / "step_00000012"
    original = (newest / "__1_0.distcp").read_bytes()
    why = _damage(newest, "truncate")
    for given in (newest, root):
        with pytest.raises(SampleError, match=f"^checkpoint {newest} is damaged \\({why}\\)"):
            load_model(given, weights="raw", log=lambda _: None)
    proc = subprocess.run([sys.executable, "-m", "train.export", "--checkpoint", str(root), "--out",
                           str(tmp_path / "export")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and why in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert f"e.g. {root / 'step_00000008'}" in proc.stderr
    assert not (tmp_path / "export").exists()
    (newest / "__1_0.distcp").write_bytes(original)
    model, _, folder, _ = load_model(root, weights="raw", log=lambda _: None)
    assert folder == newest and model.cfg.depth > 0


@pytest.mark.distributed
def test_logged_step_figures_reduce_as_documented(straight):
    """parallel/distributed.py reduce_step: the data counts are summed over the 2 ranks (every sample read so
    far, by both), the MoE scalars are rank 0's own (each layer's expert loads are fractions of its slots)."""
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    per_step = rows[1]["data/good"] - rows[0]["data/good"]
    assert per_step == rows[0]["samples_seen"] and rows[-1]["data/good"] >= rows[-1]["samples_seen"]
    for r in rows:
        loads = [v for k, v in r.items() if k.startswith("moe/layer0/load/")]
        assert loads and abs(sum(loads) - 1) < 1e-6, (r["step"], sum(loads))
