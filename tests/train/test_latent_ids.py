"""Training on latent shards that carry token ids (precompute --text-storage ids) through `python -m train`:
the encoder settings come from the shards' manifest.json and the frozen T5 runs online, for the torch and
the DeepSpeed engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = ["data=latent_shards", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16", "train.steps=2",
        "train.log_every=1", "model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1",
        "model.moe.num_experts=4", "model.moe.group_size=256", "model.moe.inference_group_size=256", "train.sample_steps=1",
        "train.sample_prompts=[a red circle]", "train.threads=1", "train.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def id_latents(tmp_path_factory) -> str:
    """2 latent shards x 16 samples (pixel VAE, 32 px) with token ids of a tiny random T5, and their manifest."""
    from data import precompute
    from data.config import DataConfig
    from data.encoders import save_random_t5
    from data.shardlist import expand_shards
    from data.synthetic import generate_sample, write_shards

    root = tmp_path_factory.mktemp("idlat")
    t5 = save_random_t5(str(root / "t5"), [generate_sample(i, 0, 32)[1] for i in range(200)])
    pattern = write_shards(str(root / "shapes"), 32, 16, 32, progress=False)
    cfg = DataConfig(text_encoder="t5", text_encoder_path=t5, max_text_len=12, batch_size=16)
    manifest = precompute.precompute(cfg, expand_shards(pattern), str(root / "latents"), storage="ids",
                                     progress=False, spec=pattern)
    assert manifest["text_storage"] == "ids" and manifest["samples"] == 32
    return manifest["pattern"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _one_rank_env() -> dict:
    """A world of one, as a launcher describes it (DeepSpeed's init_distributed reads it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _check(proc, run_dir: Path, manifest_dir: Path):
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    saved = json.loads(next((run_dir / "checkpoints").glob("step_*/config.json")).read_text())
    settings = json.loads((manifest_dir / "manifest.json").read_text())["settings"]
    assert {k: saved["data"][k] for k in ("text_storage", "text_encoder", "text_encoder_path", "max_text_len")} == \
        {k: settings[k] for k in ("text_storage", "text_encoder", "text_encoder_path", "max_text_len")}
    assert saved["model_resolved"]["text_dim"] == 64 and saved["model_resolved"]["text_len"] == 12


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_trains_on_token_id_latents_with_the_text_encoder_online(id_latents, tmp_path, engine):
    parallel = ["parallel=deepspeed_zero2"] if engine == "deepspeed" else []
    proc = subprocess.run([sys.executable, "-m", "train", *BASE, *parallel, f"data.shards='{id_latents}'",
                           f"train.run_dir={tmp_path}/run"], cwd=ROOT, timeout=300, capture_output=True, text=True,
                          env=_one_rank_env() if engine == "deepspeed" else _env())
    _check(proc, tmp_path / "run", Path(id_latents).parent)
    assert f"engine {engine}" in proc.stdout


def test_online_encoders_follow_the_data_and_the_autocast_dtype():
    import torch

    from data.config import DataConfig
    from data.encoders import online_encoders as _frozen_encoders

    assert _frozen_encoders(DataConfig(kind="latent", text_storage="emb"), "cpu", use_bf16=True) is None
    ids = _frozen_encoders(DataConfig(kind="latent", text_storage="ids"), "cpu", use_bf16=True)
    assert ids.vae is None and ids.text.model.dtype == torch.bfloat16  # the run's autocast dtype
    pinned = _frozen_encoders(DataConfig(kind="latent", encoder_dtype="fp32"), "cpu", use_bf16=True)
    assert pinned.text.model.dtype == torch.float32  # text_storage unknown: the text encoder is loaded
