"""Shared fixtures: small shapes shards, a tiny random T5 (+ offline tokenizer) and a tiny AutoencoderKL."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_SHARDS, SHARD_SIZE = 8, 40


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """8 shards x 40 shapes samples (32x32), seed 0."""
    from data.synthetic import write_shards

    out = tmp_path_factory.mktemp("shapes")
    pattern = write_shards(str(out), N_SHARDS * SHARD_SIZE, SHARD_SIZE, 32, seed=0, progress=False)
    return dict(dir=str(out), pattern=pattern, keys={f"{i:09d}" for i in range(N_SHARDS * SHARD_SIZE)})


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A random 2-layer T5EncoderModel (d_model 64) with a word-level tokenizer trained offline on captions."""
    from data.encoders import save_random_t5
    from data.synthetic import generate_sample

    captions = [generate_sample(i, 0, 32)[1] for i in range(500)]
    return save_random_t5(str(tmp_path_factory.mktemp("t5tiny")), captions, d_model=64)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random AutoencoderKL with 8 latent channels and 4x downsampling, scaling_factor 0.5."""
    import torch
    from diffusers import AutoencoderKL

    out = str(tmp_path_factory.mktemp("vaetiny"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, scaling_factor=0.5)
    vae.save_pretrained(out)
    return out
