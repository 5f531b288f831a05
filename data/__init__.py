"""Data: WebDataset shards, frozen encoders, latent precompute and the embedded shapes dataset.

    from data import DataConfig, data_shapes, make_image_loader, make_latent_loader, FrozenEncoders
"""

from data.config import DataConfig, DataShapes, data_shapes
from data.encoders import FrozenEncoders, load_text_encoder, load_vae
from data.shards import TooManyBadSamples, make_image_loader, make_latent_loader, make_loader

__all__ = ["DataConfig", "DataShapes", "data_shapes", "FrozenEncoders", "load_text_encoder", "load_vae",
           "TooManyBadSamples", "make_image_loader", "make_latent_loader", "make_loader"]
