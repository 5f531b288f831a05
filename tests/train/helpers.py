"""Helpers for the sampler / evaluation tests: a fake text encoder and a tiny saved EC checkpoint."""

import warnings
import zlib
from pathlib import Path

import torch

from tests.model.helpers import tiny_model

# What the tiny checkpoints are trained "for": the embedded encoders (MiniLM 384-dim, pixel VAE) at 8x8.
TINY_DATA = {"text_encoder": "minilm", "vae": "pixel", "max_text_len": 8, "image_size": 8, "shards": "ignored"}


class FakeText:
    """Deterministic per-caption embeddings [B, L, dim] with a padding mask (words + 1 tokens)."""

    def __init__(self, dim=32, max_len=8):
        self.dim, self.max_len = dim, max_len

    def __call__(self, captions):
        B, L = len(captions), self.max_len
        emb, mask = torch.zeros(B, L, self.dim), torch.zeros(B, L, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = min(L, len(c.split()) + 1)
            g = torch.Generator().manual_seed(zlib.crc32(c.encode()))
            emb[i, :n] = torch.randn(n, self.dim, generator=g)
            mask[i, :n] = True
        return emb, mask


def save_tiny_checkpoints(root: Path) -> Path:
    """A tiny EC model for the embedded encoders saved under `root`: two DCP step checkpoints in
    root/ckpt (step 1: other weights, plain run config; step 2: the training app's layout, the model
    group under "model" and the full DiTConfig under "model_resolved") and a safetensors export in
    root/export (step 2's weights)."""
    from model.config import config_to_dict
    from train.checkpoint import Checkpointer
    from train.weights import export_safetensors

    model, cfg = tiny_model("tiny-ec", dtype=torch.float32, text_dim=384, in_channels=3, text_len=8)
    plain_cfg = {"model": config_to_dict(cfg), "data": TINY_DATA}
    app_cfg = {"model": {"preset": "tiny-ec", "text_dim": 384}, "model_resolved": config_to_dict(cfg),
               "data": TINY_DATA}
    ck = Checkpointer(root / "ckpt")
    old, _ = tiny_model("tiny-ec", seed=5, dtype=torch.float32, text_dim=384, in_channels=3, text_len=8)
    with warnings.catch_warnings():  # DCP: "torch.distributed is disabled ... single process" (intended)
        warnings.simplefilter("ignore", UserWarning)
        ck.save(1, old, config=plain_cfg)  # an older step with other weights
        ck.save(2, model, config=app_cfg)
    export_safetensors(model, root / "export")
    return root
