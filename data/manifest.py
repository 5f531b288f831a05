"""manifest.json of a latent shard set (written by python -m data.precompute): the encoder settings the
latents were made with, so that a training run need not repeat them.

    cfg = apply_manifest(cfg)   # DataConfig with text storage, encoders, image size from the manifest

The manifest lives next to the shards: the directory of the first shard URL (local paths only; pipe: and
http(s): URLs are left alone, as is a set without a manifest). A field the run config leaves at
DataConfig's default is taken from the manifest; a field set to another value must agree with it, else
ManifestMismatch names the field and both values before anything is built. max_text_len is taken when
left at its default and may be overridden (shorter captions are truncated, longer ones padded). The
latent shape and text width the resulting config implies are checked against the recorded ones.
"""

from __future__ import annotations

import json
import os

from data.config import DataConfig, data_shapes
from data.jsonio import write_json_atomic
from data.shardlist import expand_shards
from model.config import ConfigError

MANIFEST = "manifest.json"
FIELDS = ("text_storage", "text_encoder", "text_encoder_path", "vae", "vae_path", "image_size")


class ManifestMismatch(ConfigError):
    """The run config disagrees with the manifest.json of its latent shards."""


def manifest_path(cfg: DataConfig) -> str | None:
    """manifest.json in the directory of the first local shard of `cfg.shards`, or None."""
    try:
        first = expand_shards(cfg.shards)[0]
    except ValueError:
        return None  # no shards: the loader's own check reports it
    if first.startswith(("pipe:", "http:", "https:")):
        return None
    path = os.path.join(os.path.dirname(first.removeprefix("file:")), MANIFEST)
    return path if os.path.isfile(path) else None


def read_manifest(cfg: DataConfig) -> tuple[str, dict] | None:
    """(path, contents) of the shards' manifest.json, or None when there is none."""
    path = manifest_path(cfg)
    if path is None:
        return None
    with open(path) as f:
        return path, json.load(f)


def write_manifest(out_dir: str, manifest: dict) -> str:
    """Write out_dir/manifest.json atomically (a temporary name, then a rename); returns its path."""
    return str(write_json_atomic(os.path.join(out_dir, MANIFEST), manifest, indent=1))


def _same(mine, theirs) -> bool:
    if mine == theirs:
        return True
    if isinstance(mine, str) and isinstance(theirs, str) and os.path.isdir(mine) and os.path.isdir(theirs):
        return os.path.realpath(mine) == os.path.realpath(theirs)
    return False


def apply_manifest(cfg: DataConfig) -> DataConfig:
    """`cfg` with the settings of its latent shards' manifest.json; unchanged without one."""
    found = read_manifest(cfg)
    if found is None:
        return cfg
    path, manifest = found
    settings, default = manifest["settings"], DataConfig()
    take = {}
    for name in FIELDS:
        mine, theirs = getattr(cfg, name), settings[name]
        if _same(mine, theirs):
            continue
        if mine != getattr(default, name):
            raise ManifestMismatch(f"data.{name}={mine!r} disagrees with {MANIFEST} {name} {theirs!r} ({path})")
        take[name] = theirs
    if cfg.max_text_len == default.max_text_len:
        take["max_text_len"] = settings["max_text_len"]
    out = cfg.replace(**take)
    _check_shapes(out, manifest, path)
    return out


def _check_shapes(cfg: DataConfig, manifest: dict, path: str) -> None:
    """The latent shape and text width of cfg's encoders (read from their configs) equal the recorded ones."""
    shapes = data_shapes(cfg)
    latent = [shapes.latent_channels, shapes.latent_size, shapes.latent_size]
    if latent != list(manifest["latent_shape"]):
        raise ManifestMismatch(f"data.vae_path={cfg.vae_path!r} gives latents {latent} at data.image_size="
                               f"{cfg.image_size}, but {MANIFEST} latent_shape is {manifest['latent_shape']} ({path})")
    if shapes.text_dim != manifest["text_dim"]:
        raise ManifestMismatch(f"data.text_encoder_path={cfg.text_encoder_path!r} has width {shapes.text_dim}, "
                               f"but {MANIFEST} text_dim is {manifest['text_dim']} ({path})")
