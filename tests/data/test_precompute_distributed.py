"""python -m data.precompute as separate processes: 2 processes under torchrun write the same shards as 1,
and a killed run leaves only complete shards, which its rerun (with decode workers) keeps while finishing
the rest."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(shapes_dir, tiny_t5, tiny_vae, out) -> list[str]:
    return ["-m", "data.precompute", "--input", shapes_dir["pattern"], "--output", str(out), "--text-storage", "ids",
            "--text-encoder", "t5", "--text-encoder-path", tiny_t5, "--max-text-len", "12", "--vae", "kl",
            "--vae-path", tiny_vae, "--latent-dtype", "bf16", "--batch-size", "16", "--no-progress"]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shapes-*.tar"))}


@pytest.fixture(scope="module")
def one_process(shapes_dir, tiny_t5, tiny_vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    proc = subprocess.run([sys.executable, *_args(shapes_dir, tiny_t5, tiny_vae, out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train on them: data=latent_shards data.shards=" in proc.stdout
    return out


@pytest.mark.distributed
def test_two_processes_write_the_same_shards_as_one(one_process, shapes_dir, tiny_t5, tiny_vae, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_args(shapes_dir, tiny_t5, tiny_vae, tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _shards(one_process)
    assert sorted(ref) == [f"shapes-{i:06d}.tar" for i in range(8)]
    assert _shards(tmp_path) == ref  # byte for byte: same samples in the same order, same latents and ids
    ranks = {json.loads((tmp_path / ".precompute" / f"{n}.json").read_text())["rank"] for n in ref}
    assert ranks == {0, 1}
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (one_process, tmp_path))
    assert two["last_run"]["world_size"] == 2 and two["last_run"]["new_samples"] == 320
    for m in (one, two):
        m.pop("last_run"), m.pop("pattern")
    assert one == two
    assert (one["samples"], one["bad"], one["latent_shape"], one["latent_dtype"], one["text_storage"],
            one["text_encoder"], one["text_dim"]) == (320, {}, [8, 8, 8], "bf16", "ids", "t5", 64)
    assert one["bytes_per_sample"] > one["bytes_per_sample_ids"]  # on disk: plus tar headers, caption, json


def test_a_killed_run_leaves_complete_shards_and_its_rerun_finishes(one_process, shapes_dir, tiny_t5, tiny_vae,
                                                                   tmp_path):
    args = [sys.executable, *_args(shapes_dir, tiny_t5, tiny_vae, tmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "shapes-000000.tar").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ref, killed = _shards(one_process), _shards(tmp_path)
    assert 1 <= len(killed) < len(ref) and not (tmp_path / "manifest.json").exists()
    assert all(killed[n] == ref[n] for n in killed)  # no partial shard under a final name
    stamps = {n: (tmp_path / n).stat().st_mtime_ns for n in killed}
    proc = subprocess.run([*args, "--workers", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in killed} == stamps  # finished shards not redone
    assert _shards(tmp_path) == ref  # decoded by 2 DataLoader workers: the same bytes
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == 320 and manifest["last_run"]["new_shards"] == len(ref) - len(killed)
