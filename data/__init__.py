"""Data: WebDataset shards, frozen encoders, latent precompute and the embedded shapes dataset.

    from data import DataConfig, data_shapes, make_image_loader, make_latent_loader, FrozenEncoders

The names below are imported on first use, so that a torch-free module of this package (jsonio.py) can be
imported without torch.
"""

from importlib import import_module

_HOMES = {"DataConfig": "data.config", "DataShapes": "data.config", "data_shapes": "data.config",
          "FrozenEncoders": "data.encoders", "load_text_encoder": "data.encoders", "load_vae": "data.encoders",
          "TooManyBadSamples": "data.shards", "make_image_loader": "data.shards",
          "make_latent_loader": "data.shards", "make_loader": "data.shards"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
