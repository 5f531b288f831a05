"""A run's shard list: data.shards (brace patterns, "::"-joined lists, local paths or pipe: URLs) expanded to
URLs, and checked before anything is built (empty, a directory, missing files, fewer shards than readers)."""

from __future__ import annotations

import os

import webdataset as wds

from data.config import DataConfig
from model.config import ConfigError


def expand_shards(shards) -> list[str]:
    """Brace patterns ("a-{000..009}.tar", "::"-joined), local paths or pipe: URLs -> list of URLs."""
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [u for s in shards for u in wds.shardlists.expand_urls(s)]
    if not urls or not all(urls):
        raise ValueError(f"data.shards: no shards in {shards!r}")
    return urls


def check_shard_list(cfg: DataConfig, world_size: int) -> list[str]:
    """The expanded shard list, or ValueError (one line naming data.shards): empty, a directory, missing
    files, or fewer shards than ranks x workers (without resampling)."""
    if not cfg.shards:
        raise ConfigError("data.shards is empty: give a brace pattern such as 'shards/data-{000000..000099}.tar'")
    if os.path.isdir(cfg.shards):
        tars = sorted(f for f in os.listdir(cfg.shards) if f.endswith(".tar"))
        hint = f" such as '{os.path.join(cfg.shards, tars[0])}'" if tars else ""
        raise ConfigError(f"data.shards={cfg.shards!r} is a directory: give the shard files as a brace pattern{hint} "
                         f"({len(tars)} .tar files there)")
    urls = expand_shards(cfg.shards)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"data.shards: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    readers = world_size * max(1, cfg.num_workers)
    if not cfg.resampled and len(urls) < readers:
        raise ConfigError(f"data.shards: {len(urls)} shards < {world_size} ranks x {max(1, cfg.num_workers)} workers; "
                         "write more shards, lower data.num_workers or set data.resampled=true")
    return urls
