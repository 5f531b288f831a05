"""The optional parts of the project (pyproject.toml's extras) and their one-line refusals.

    require("deepspeed", "parallel.engine=deepspeed")   # MissingExtra unless DeepSpeed is importable
    check(app_cfg)                                      # the same for every extra a config needs

Beside model/config.py's ConfigError, which a missing extra is, so that every folder can refuse alike.
`pip install ecdit` is the core (model, shapes data, FSDP / expert-parallel training, sampling, export);
`pip install 'ecdit[deepspeed]'` and so on add the rest; `ecdit[all]` is every extra, `ecdit[dev]` all
of them and the test tools. Slurm needs no Python package (launch/slurm/ runs sbatch / srun).
"""

from __future__ import annotations

import importlib.util

from model.config import ConfigError

# extra -> (the module it provides, the name a user knows it by)
EXTRAS = {
    "deepspeed": ("deepspeed", "DeepSpeed"),
    "megatron": ("megatron.core", "megatron-core"),
    "wandb": ("wandb", "wandb"),
    "study": ("matplotlib", "matplotlib"),
}


class MissingExtra(ConfigError):
    """A feature's optional dependency is not installed; the message names the extra to install."""


def installed(extra: str) -> bool:
    """Whether the module of `extra` can be imported (found on the path; it is not imported here)."""
    try:
        return importlib.util.find_spec(EXTRAS[extra][0]) is not None
    except (ImportError, ValueError):  # a missing parent package, or a None entry in sys.modules
        return False


def message(extra: str, feature: str) -> str:
    """`<feature> needs <name>: pip install 'ecdit[<extra>]'`."""
    return f"{feature} needs {EXTRAS[extra][1]}: pip install 'ecdit[{extra}]'"


def require(extra: str, feature: str) -> None:
    """Raise `MissingExtra` (one line naming `feature` and the extra) unless `extra` is installed."""
    if not installed(extra):
        raise MissingExtra(message(extra, feature))


def needed(cfg) -> list[tuple[str, str]]:
    """(extra, feature) for every extra that a training config (train/config.py AppConfig:
    its `parallel` fields) cannot run without. Not wandb:
    without it train/metrics.py says so in one line and writes metrics.jsonl only."""
    p = cfg.parallel
    out = []
    if p.engine == "deepspeed":
        out.append(("deepspeed", "parallel.engine=deepspeed"))
    if p.dispatcher.startswith("megatron_"):
        out.append(("megatron", f"parallel.dispatcher={p.dispatcher}"))
    return out


def check(cfg) -> None:
    """Raise `MissingExtra` for the first extra that `cfg` uses and that is not installed: called before
    any process group exists, every rank refuses alike."""
    for extra, feature in needed(cfg):
        require(extra, feature)


__all__ = ["EXTRAS", "MissingExtra", "check", "installed", "message", "needed", "require"]
