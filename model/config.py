"""Model configuration: dataclasses, validation, and the EC-DiT paper's presets (Table 1).

Every check raises `ConfigError` with a message that names the offending field (``model.<field>``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

ROUTERS = ("expert_choice", "token_choice", "diffmoe")
# How GroupedExperts multiplies [E, X, D] slots by the stacked weights (model/moe.py).
EXPERT_MATMULS = ("bmm", "grouped_mm")
GROUP_MODES = ("tokens", "sample", "batch")
# Inference routing: the training-style groups, or "dynamic" (each expert takes the tokens whose score
# passes its threshold: batch-independent, compute adapts per token).
INFERENCE_MODES = GROUP_MODES + ("dynamic",)

# Frozen encoders the paper counts in its Table 1 totals (Section 3.1): a 670M T5 and a 34M VAE.
T5_PARAMS = 670_000_000
VAE_PARAMS = 34_000_000


class ConfigError(ValueError):
    """A bad configuration value or combination, raised by every config check of the project (model,
    data, flow, parallel, trainer). The message starts with the dotted path of the field
    (``model.moe.num_experts=3 must be divisible by parallel.ep=2``); `field` is that path."""

    @property
    def field(self) -> str:
        head = str(self).split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
        return head


@dataclass
class MoEConfig:
    """The MoE FFN that replaces the dense FFN in every other block (from the second).

    expert_choice: each expert takes its top-Q tokens of a routing group, Q = G * capacity_factor / E.
    token_choice: GShard top-k; each expert keeps at most ceil(tc_capacity_factor * top_k * G / E)
    tokens per group, overflow is dropped (passes through the residual); load-balancing aux loss.
    diffmoe: expert choice over a batch-level token pool (group "batch"; with `global_pool` across
    data-parallel ranks) plus a capacity predictor (MLP on the detached router input, trained with BCE
    to predict which experts take a token) whose per-expert thresholds drive "dynamic" inference.

    Every expert-choice router (expert_choice, diffmoe) tracks per expert an EMA of the training-time
    cut-off score (the Q-th best score of a group: the affinity, or the predictor's score for diffmoe);
    "dynamic" inference lets each expert take the tokens whose score passes threshold * dynamic_multiplier.
    """

    num_experts: int = 8
    router: str = "expert_choice"
    # f_c: the average number of experts per token (expert choice), as in the EC-DiT paper. Not GShard's or
    # megatron-core's "capacity factor" (slack above the even share): that one is tc_capacity_factor.
    capacity_factor: float = 2.0
    top_k: int = 2  # token choice
    tc_capacity_factor: float = 1.0  # token choice slack; 1.0 = same expert FLOPs as EC at f_c = top_k
    aux_loss_weight: float = 0.01  # token choice load-balancing loss weight
    # Routing group in training and in inference (eval mode): "tokens" = fixed groups of group_size
    # tokens over the flattened local batch, "sample" = one image, "batch" = the whole local batch.
    group: str = "tokens"
    group_size: int = 1024
    inference_group: str = "tokens"
    inference_group_size: int = 512
    # DiffMoE and dynamic inference.
    predictor_weight: float = 1.0  # weight of the capacity predictor's BCE loss (diffmoe)
    predictor_hidden: int = 0  # hidden width of the predictor MLP (0: the model width)
    threshold_decay: float = 0.99  # EMA decay of the per-expert cut-off scores
    dynamic_multiplier: float = 1.0  # threshold multiplier at inference: > 1 fewer tokens, < 1 more
    global_pool: bool = False  # expert choice across data-parallel ranks (all-gathered scores)
    pool_slack: float = 2.0  # global pool: local slots per expert = pool_slack * local capacity
    expert_matmul: str = "bmm"  # bmm | grouped_mm (torch._grouped_mm, where this torch has it)

    def validate(self, prefix: str = "model.moe") -> None:
        if self.num_experts < 1:
            raise ConfigError(f"{prefix}.num_experts={self.num_experts} must be >= 1")
        if self.router not in ROUTERS:
            raise ConfigError(f"{prefix}.router={self.router!r} must be one of {ROUTERS}")
        if self.group not in GROUP_MODES:
            raise ConfigError(f"{prefix}.group={self.group!r} must be one of {GROUP_MODES}")
        if self.inference_group not in INFERENCE_MODES:
            raise ConfigError(f"{prefix}.inference_group={self.inference_group!r} must be one of {INFERENCE_MODES}")
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ConfigError(f"{prefix}.threshold_decay={self.threshold_decay} must be in [0, 1)")
        if self.dynamic_multiplier <= 0:
            raise ConfigError(f"{prefix}.dynamic_multiplier={self.dynamic_multiplier} must be > 0")
        if self.predictor_weight < 0 or self.predictor_hidden < 0:
            raise ConfigError(f"{prefix}.predictor_weight and {prefix}.predictor_hidden must be >= 0")
        if self.global_pool and self.router == "token_choice":
            raise ConfigError(f"{prefix}.global_pool needs an expert-choice router (expert_choice or diffmoe)")
        if self.global_pool and self.group != "batch":
            raise ConfigError(f"{prefix}.global_pool pools whole batches: set {prefix}.group=batch "
                              f"(got {self.group!r})")
        if self.expert_matmul not in EXPERT_MATMULS:
            raise ConfigError(f"{prefix}.expert_matmul={self.expert_matmul!r} must be one of {EXPERT_MATMULS}")
        if self.expert_matmul == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise ConfigError(f"{prefix}.expert_matmul=grouped_mm needs torch._grouped_mm, which torch "
                              f"{torch.__version__} lacks; use bmm")
        if self.pool_slack < 1.0:
            raise ConfigError(f"{prefix}.pool_slack={self.pool_slack} must be >= 1")
        for name in ("group_size", "inference_group_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 1")
        if self.router != "token_choice":
            if not 0 < self.capacity_factor <= self.num_experts:
                raise ConfigError(
                    f"{prefix}.capacity_factor={self.capacity_factor} must be in (0, num_experts="
                    f"{self.num_experts}] (it is the average number of experts per token)")
        else:
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(f"{prefix}.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
            if self.tc_capacity_factor <= 0:
                raise ConfigError(f"{prefix}.tc_capacity_factor={self.tc_capacity_factor} must be > 0")
            if self.aux_loss_weight < 0:
                raise ConfigError(f"{prefix}.aux_loss_weight={self.aux_loss_weight} must be >= 0")

    @property
    def experts_per_token(self) -> float:
        """Average experts that process a token (the activated-compute multiplier of a MoE FFN)."""
        return float(self.top_k) if self.router == "token_choice" else self.capacity_factor

    @property
    def is_expert_choice(self) -> bool:
        """expert_choice or diffmoe: experts pick tokens (top-Q of a group), no auxiliary loss."""
        return self.router != "token_choice"

    def capacity(self, group_tokens: int) -> int:
        """Slots per expert in a routing group of G = `group_tokens` tokens. Expert choice: round(G * f_c / E),
        rounded half to even (Python's round), so that the realised experts per token stay closest to f_c;
        the DiffMoE authors' code floors instead (the two differ when G * f_c / E is not an integer).
        Token choice: ceil(tc_capacity_factor * top_k * G / E)."""
        E = self.num_experts
        if self.is_expert_choice:
            return min(group_tokens, round(group_tokens * self.capacity_factor / E))
        return min(group_tokens, math.ceil(self.tc_capacity_factor * self.top_k * group_tokens / E))


@dataclass
class DiTConfig:
    """An EC-DiT / DiT network: (x_t, t, text) -> velocity.

    Latents are [in_channels, input_size, input_size]; patches of patch_size**2 make
    S = (input_size / patch_size)**2 tokens per image, of which round(S * (1 - mask_ratio)) are kept in
    training (MaskDiT drop-and-restore; see README). Text embeddings are [text_len, text_dim].
    """

    name: str = "custom"
    depth: int = 28
    dim: int = 1152
    heads: int = 18
    kv_heads: int = 6
    mlp_ratio: float = 4.0
    # FFN / expert biases. Table 1's MoE increments fit bias-free experts (3XL-16E misses the table's
    # rounding with biases), so the paper presets have none; each expert = the dense FFN either way.
    ffn_bias: bool = False
    patch_size: int = 2
    in_channels: int = 8
    input_size: int = 32
    # The paper's T5 is "670M"; its hidden size is not stated. 1024 (the T5-large family) reproduces
    # Table 1's XL total to two decimals; set it to your text encoder's width.
    text_dim: int = 1024
    text_len: int = 120
    qk_norm: bool = True
    mask_ratio: float = 0.5  # fraction of tokens dropped in training (MaskDiT)
    moe: MoEConfig | None = None  # None: dense model
    moe_every: int = 2  # MoE FFN in blocks moe_every, 2*moe_every, ... (1-based): 2, 4, 6, ...
    # Dense baselines only: width multiplier of the FFN at the MoE positions, so that a dense model can
    # match a MoE model's activated compute (set it to the MoE's experts per token).
    moe_position_ffn_scale: float = 1.0
    freq_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def kept_tokens(self) -> int:
        """Tokens per image that the blocks see in training."""
        return max(1, round(self.num_tokens * (1.0 - self.mask_ratio)))

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels

    def is_moe_position(self, i: int) -> bool:
        """Block i (0-based) is a MoE position: every other block starting from the second."""
        return (i + 1) % self.moe_every == 0

    def is_moe_block(self, i: int) -> bool:
        """Block i (0-based) holds a MoE FFN."""
        return self.moe is not None and self.is_moe_position(i)

    def dense_ffn_dim(self, i: int) -> int:
        """Hidden width of block i's dense FFN (widened at MoE positions of equal-compute baselines)."""
        scale = self.moe_position_ffn_scale if self.is_moe_position(i) else 1.0
        return int(round(self.ffn_dim * scale))

    @property
    def num_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.depth))

    def validate(self) -> "DiTConfig":
        p = "model"
        for name in ("depth", "dim", "heads", "kv_heads", "patch_size", "in_channels", "input_size",
                     "text_dim", "text_len", "moe_every", "freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}.{name}={getattr(self, name)} must be >= 1")
        if self.dim % self.heads:
            raise ConfigError(f"{p}.heads={self.heads} must divide {p}.dim={self.dim}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{p}.kv_heads={self.kv_heads} must divide {p}.heads={self.heads}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"{p}.patch_size={self.patch_size} must divide {p}.input_size={self.input_size}")
        if self.mlp_ratio <= 0 or self.moe_position_ffn_scale <= 0:
            raise ConfigError(f"{p}.mlp_ratio and {p}.moe_position_ffn_scale must be > 0")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"{p}.mask_ratio={self.mask_ratio} must be in [0, 1)")
        if self.freq_dim % 2:
            raise ConfigError(f"{p}.freq_dim={self.freq_dim} must be even")
        if self.moe is not None:
            self.moe.validate(f"{p}.moe")
            self._validate_capacity()
        return self

    def _validate_capacity(self) -> None:
        """Every routing group this config can form must give each expert at least one slot."""
        moe = self.moe
        assert moe is not None
        # (field named in the error, tokens in the group). A batch smaller than one "tokens" group is
        # routed as one group, so one image is the smallest group in every mode.
        groups = [("model.moe.group_size", moe.group_size) if moe.group == "tokens" else None,
                  ("model.moe.inference_group_size", moe.inference_group_size)
                  if moe.inference_group == "tokens" else None,
                  ("model.mask_ratio (tokens per training image)", self.kept_tokens),
                  ("model.input_size (tokens per image)", self.num_tokens)]
        for fld, g in filter(None, groups):
            if moe.capacity(g) < 1:
                raise ConfigError(
                    f"{fld}: a routing group of {g} tokens gives a capacity of 0 tokens per expert "
                    f"(num_experts={moe.num_experts}, capacity_factor={moe.capacity_factor}); use larger "
                    f"groups, fewer experts or a larger model.moe.capacity_factor")


def _paper(name: str, depth: int, dim: int, heads: int, kv: int, experts: int | None = None,
           router: str = "expert_choice") -> DiTConfig:
    moe = None if experts is None else MoEConfig(num_experts=experts, router=router)
    return DiTConfig(name=name, depth=depth, dim=dim, heads=heads, kv_heads=kv, moe=moe)


def _build_presets() -> dict[str, DiTConfig]:
    presets: dict[str, DiTConfig] = {}
    # Table 1: layers, hidden, heads, kv heads.
    for size, (depth, dim, heads, kv) in {"xl": (28, 1152, 18, 6), "xxl": (38, 1536, 24, 6),
                                          "3xl": (42, 2304, 36, 6)}.items():
        presets[f"dense-{size}"] = _paper(f"dense-{size}", depth, dim, heads, kv)
        for e in (8, 16, 32):
            presets[f"ec-{size}-{e}e"] = _paper(f"ec-{size}-{e}e", depth, dim, heads, kv, e)
            presets[f"tc-{size}-{e}e"] = _paper(f"tc-{size}-{e}e", depth, dim, heads, kv, e, "token_choice")
    presets["dense-m"] = _paper("dense-m", 46, 3072, 48, 12)
    # EC-DiT-M-64E trades depth for width: 38 layers (Table 1 footnote).
    presets["ec-m-64e"] = _paper("ec-m-64e", 38, 3072, 48, 12, 64)

    # Small presets for tests and CPU runs. "small-*" matches the embedded shapes data
    # (32x32 RGB through the identity pixel VAE, MiniLM text embeddings of width 384).
    tiny = dict(depth=4, dim=64, heads=4, kv_heads=2, in_channels=4, input_size=8, text_dim=32, text_len=8,
                ffn_bias=True)  # biases on, so the tests cover both FFN variants
    tiny_moe = dict(num_experts=4, group_size=32, inference_group_size=32)
    presets["tiny-dense"] = DiTConfig(name="tiny-dense", **tiny)
    presets["tiny-ec"] = DiTConfig(name="tiny-ec", moe=MoEConfig(**tiny_moe), **tiny)
    presets["tiny-tc"] = DiTConfig(name="tiny-tc", moe=MoEConfig(router="token_choice", **tiny_moe), **tiny)
    presets["tiny-diffmoe"] = DiTConfig(name="tiny-diffmoe", moe=MoEConfig(router="diffmoe", group="batch",
                                                                            **tiny_moe), **tiny)
    small = dict(depth=6, dim=192, heads=6, kv_heads=2, in_channels=3, input_size=32, text_dim=384, text_len=32)
    small_moe = dict(num_experts=8, group_size=512, inference_group_size=512)
    presets["small-dense"] = DiTConfig(name="small-dense", **small)
    presets["small-ec"] = DiTConfig(name="small-ec", moe=MoEConfig(**small_moe), **small)
    presets["small-tc"] = DiTConfig(name="small-tc", moe=MoEConfig(router="token_choice", **small_moe), **small)
    presets["small-diffmoe"] = DiTConfig(name="small-diffmoe", moe=MoEConfig(router="diffmoe", group="batch",
                                                                              **small_moe), **small)
    # The routing study (bench/study.py): four models at equal activated compute on the shapes data. The
    # dense one widens its FFNs at the MoE positions by f_c = top_k = 2.
    study = dict(small, depth=6, dim=128, heads=4, kv_heads=2)
    study_moe = dict(num_experts=8, group_size=1024, inference_group_size=512)
    presets["study-dense"] = DiTConfig(name="study-dense", moe_position_ffn_scale=2.0, **study)
    presets["study-ec"] = DiTConfig(name="study-ec", moe=MoEConfig(**study_moe), **study)
    presets["study-tc"] = DiTConfig(name="study-tc", moe=MoEConfig(router="token_choice", **study_moe), **study)
    presets["study-diffmoe"] = DiTConfig(name="study-diffmoe", moe=MoEConfig(router="diffmoe", group="batch",
                                                                              **study_moe), **study)
    # The paper-claims study (bench/paper_claims.py): a narrow backbone (6 blocks, d 64) on the 32 px
    # paper-claims mix, where FFN capacity binds. pc-dense is the same backbone as the MoE arms (the paper's
    # Fig. 8 baseline), pc-dense-wide doubles the FFN of every block (the capacity control), pc-dense-eq
    # doubles it at the MoE positions only (equal activated compute). MoE every other block, f_c = top_k = 2.
    pc = dict(small, depth=6, dim=64, heads=4, kv_heads=2)
    pc_moe = dict(group_size=1024, inference_group_size=512)
    presets["pc-dense"] = DiTConfig(name="pc-dense", **pc)
    presets["pc-dense-wide"] = DiTConfig(name="pc-dense-wide", mlp_ratio=8.0, **pc)
    presets["pc-dense-eq"] = DiTConfig(name="pc-dense-eq", moe_position_ffn_scale=2.0, **pc)
    for e in (8, 16, 32):
        presets[f"pc-ec-{e}e"] = DiTConfig(name=f"pc-ec-{e}e", moe=MoEConfig(num_experts=e, **pc_moe), **pc)
    presets["pc-tc-8e"] = DiTConfig(name="pc-tc-8e", moe=MoEConfig(num_experts=8, router="token_choice", **pc_moe),
                                    **pc)
    for cfg in presets.values():
        cfg.validate()
    return presets


PRESETS: dict[str, DiTConfig] = _build_presets()

# Table 1 of the paper: total parameters in billions (they appear to include the frozen T5 and VAE).
PAPER_TOTAL_B: dict[str, float] = {
    "dense-xl": 1.47, "ec-xl-8e": 2.51, "ec-xl-16e": 3.70, "ec-xl-32e": 6.08,
    "dense-xxl": 2.35, "ec-xxl-8e": 4.87, "ec-xxl-16e": 7.73, "ec-xxl-32e": 13.47,
    "dense-3xl": 4.50, "ec-3xl-8e": 10.74, "ec-3xl-16e": 17.87, "ec-3xl-32e": 32.15,
    "dense-m": 8.03, "ec-m-64e": 97.21,
}
# Table 1 "Activated Params." of the EC-DiT models (one figure per backbone).
PAPER_ACTIVATED_B: dict[str, float] = {"xl": 1.62, "xxl": 2.71, "3xl": 5.18, "m": 8.27}


def get_preset(name: str, **overrides) -> DiTConfig:
    """A validated copy of a named preset; `overrides` replace top-level fields (``moe`` may be a dict)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"model={name} is unknown; choose one of: {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[key])
    if cfg.moe is not None:
        cfg.moe = dataclasses.replace(cfg.moe)
    moe_over = overrides.pop("moe", None)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f"model.{k} is not a model config field")
        setattr(cfg, k, v)
    if moe_over is not None:
        if cfg.moe is None:
            raise ConfigError(f"model.moe overrides given for dense preset {name!r}")
        for k, v in moe_over.items():
            if not hasattr(cfg.moe, k):
                raise ConfigError(f"model.moe.{k} is not a MoE config field")
            setattr(cfg.moe, k, v)
    return cfg.validate()


def dense_twin(cfg: DiTConfig, equal_compute: bool = False) -> DiTConfig:
    """The dense model with the same backbone; with `equal_compute`, its FFNs at the MoE positions are
    widened by the MoE's experts per token so that activated FLOPs match."""
    scale = cfg.moe.experts_per_token if (equal_compute and cfg.moe is not None) else 1.0
    name = f"{cfg.name}-dense{'-eq' if equal_compute else ''}"
    return dataclasses.replace(cfg, name=name, moe=None, moe_position_ffn_scale=scale).validate()


# The fields the data decides, and the data/config.py DataShapes attribute that gives each.
SHAPE_FIELDS = {"in_channels": "latent_channels", "input_size": "latent_size", "text_dim": "text_dim",
                "text_len": "max_text_len"}


def config_for_data(spec: DiTConfig, shapes, batch_size: int) -> DiTConfig:
    """The network's config for the data: `spec` (a preset with its overrides; a shape field left None is
    set from `shapes`, a data/config.py DataShapes, and one that is set must agree), validated, with its
    routing groups checked against the tokens of one micro-batch of `batch_size` images."""
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(DiTConfig)}
    for name, attr in SHAPE_FIELDS.items():
        given, wanted = values[name], getattr(shapes, attr)
        if given is not None and given != wanted:
            raise ConfigError(f"model.{name}={given} disagrees with the data, which gives {wanted}; leave it "
                              f"unset (null): the data sets it")
        values[name] = wanted
    moe = values.pop("moe")
    cfg = DiTConfig(**values, moe=None if moe is None else dataclasses.replace(moe)).validate()
    routed = batch_size * cfg.kept_tokens  # tokens one rank routes per micro-batch
    moe = cfg.moe
    if moe is not None and moe.group == "tokens" and routed > moe.group_size and routed % moe.group_size:
        raise ConfigError(f"model.moe.group_size={moe.group_size} must divide the {routed} tokens a rank routes "
                          f"per micro-batch (data.batch_size={batch_size} x {cfg.kept_tokens} kept tokens per "
                          f"image); change either, or set model.moe.group=sample")
    return cfg


def config_to_dict(cfg: DiTConfig) -> dict:
    """Plain dict (JSON-able) of a model config."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> DiTConfig:
    """Inverse of `config_to_dict`; unknown keys are an error naming the field."""
    d = dict(d)
    moe = d.pop("moe", None)
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    for k in d:
        if k not in fields:
            raise ConfigError(f"model.{k} is not a model config field")
    if moe is not None:
        moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
        for k in moe:
            if k not in moe_fields:
                raise ConfigError(f"model.moe.{k} is not a MoE config field")
        moe = MoEConfig(**moe)
    return DiTConfig(moe=moe, **d).validate()


__all__ = ["ConfigError", "MoEConfig", "DiTConfig", "PRESETS", "INFERENCE_MODES", "PAPER_TOTAL_B", "PAPER_ACTIVATED_B",
           "SHAPE_FIELDS", "config_for_data", "config_to_dict", "config_from_dict", "T5_PARAMS", "VAE_PARAMS",
           "get_preset", "dense_twin", "ROUTERS", "GROUP_MODES", "EXPERT_MATMULS"]
