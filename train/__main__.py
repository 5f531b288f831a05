"""Hydra entry point: `python -m train [overrides]`, `torchrun ... -m train [overrides]`,
`deepspeed --num_gpus N train/__main__.py [overrides]`.

Examples:
    python -m train experiment=cpu_small train.steps=50
    torchrun --nproc_per_node=2 -m train experiment=cpu_small
    python -m train model=ec-xl-8e parallel=fsdp_ep parallel.ep=8 data=latent_shards data.shards=...

Only rank 0 writes Hydra's files into the run directory (train.run_dir, the same on every rank).
Bad overrides fail before any process group is created, with the field named.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (the deepspeed launcher): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prepare_argv(argv: list[str]) -> list[str]:
    """Strip the `--local_rank=N` the deepspeed launcher appends (Hydra rejects it); on ranks other
    than 0, keep Hydra from writing its config files and logs."""
    out = []
    for a in argv:
        if a.startswith("--local_rank") or a.startswith("--local-rank"):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1] if "=" in a else "0")
            continue
        out.append(_quote_braces(a))
    if int(os.environ.get("RANK", 0)) != 0:
        out += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return out


def _quote_braces(arg: str) -> str:
    """`key=shards-{000000..000999}.tar` as bash passes `key='shards-{...}.tar'` on: Hydra's grammar reads an
    unquoted `{` as a dict, so a brace-pattern value gets the quotes the shell removed."""
    key, sep, value = arg.partition("=")
    if sep and "{" in value and ".." in value and "${" not in value and value[:1] not in "'\"":
        return f"{key}='{value}'"
    return arg


def _composition_error(overrides: list[str]) -> str | None:
    """None if the overrides compose, else one line naming the first override that breaks composition
    (Hydra's own report spans several lines, or is a traceback)."""
    from train.config import compose

    args = [a for a in overrides if ("=" in a or a.startswith("~")) and not a.startswith(("-", "hydra"))]

    def failure(prefix: list[str]) -> Exception | None:
        try:
            compose(prefix)
        except Exception as e:  # noqa: BLE001 - any composition failure is reported as one line
            return e
        return None

    err = failure(args)
    if err is None:
        return None
    culprit = next((a for i, a in enumerate(args) if failure(args[:i + 1]) is not None), "")
    cause = err.__cause__ if err.__cause__ is not None else err
    lines = (str(cause).strip() or type(cause).__name__).splitlines()
    first = lines[0]
    start = next((i for i, line in enumerate(lines) if line.startswith("Available options")), len(lines))
    options = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("\t"), lines[start + 1:])]
    if options:
        first += f" (options: {', '.join(options)})"
    elif isinstance(cause, AssertionError) and "NoneType" in "\n".join(lines):
        parent = culprit.partition("=")[0].rsplit(".", 1)[0]
        first = f"{parent} is null here (a dense preset has no model.moe), so it has no fields to set"
    return f"{culprit}: {first}" if culprit else first


def main() -> None:
    sys.argv = [sys.argv[0]] + _prepare_argv(sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    import hydra
    from omegaconf import OmegaConf

    from model.config import ConfigError
    from train.config import CONF_DIR, register
    register()
    problem = _composition_error(sys.argv[1:])
    if problem is not None:
        _error(problem)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _app(cfg) -> None:
        from omegaconf.errors import OmegaConfBaseException

        from data import TooManyBadSamples
        from train.config import AppConfig
        from train.failures import CollectiveFailure, StopTraining
        from train.lifecycle import run
        try:
            app: AppConfig = OmegaConf.to_object(cfg)  # runs the dataclasses' own checks (e.g. DataConfig)
        except (ValueError, OmegaConfBaseException) as e:
            _error(_first_line(e))
            sys.exit(2)
        try:
            summary = run(app)
        except (ConfigError, StopTraining, TooManyBadSamples) as e:
            _error(str(e))
            sys.exit(2)
        except CollectiveFailure as e:  # a restart (launch/local.sh MAX_RESTARTS, slurm requeue) can get past it
            _error(str(e))
            os._exit(3)  # no interpreter teardown: it can wait on the failed process group's threads
        if int(os.environ.get("RANK", 0)) == 0:
            _print_summary(summary, sys.argv[1:])

    _app()


def _error(message: str) -> None:
    """`error: <message>` on stderr in one write, so that the lines of several ranks do not interleave."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _first_line(e: Exception) -> str:
    """The message of a config error without OmegaConf's trailing context lines (full_key, object_type)."""
    cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
    return str(cause).strip().splitlines()[0]


def _print_summary(s: dict, overrides: list[str]) -> None:
    print("\n[train] done" if not s.get("stopped_by_signal") else "\n[train] stopped by signal", flush=True)
    print(f"  steps:        {s['step']}  (loss {s['first_loss']} -> {s['last_loss']})")
    if "data_exhausted" in s:
        e = s["data_exhausted"]
        print(f"  data ended:   {e['samples_delivered']} samples trained on, {e['samples_unread']} not "
              f"({e['ranks_dry']} rank(s) ran dry)")
    if "data" in s:
        bad = {k.rsplit("/", 1)[1]: v for k, v in s["data"].items() if k.startswith("data/bad/") and v}
        print(f"  data:         {s['data']['data/good']} good samples, {sum(bad.values())} skipped as bad"
              + (f" {bad}" if bad else ""))
    print(f"  run dir:      {s['run_dir']}  (metrics.jsonl, .hydra/config.yaml)")
    print(f"  checkpoints:  {s['checkpoints']}")
    if s.get("wandb_dir"):
        print(f"  wandb:        {s['wandb_dir']}  (offline: `wandb sync {s['wandb_dir']}`)")
    for key in ("sample_grid", "expert_heatmap"):
        if key in s:
            print(f"  {key.replace('_', ' '):<13} {s[key]}")
    print("  resume:       rerun the same command (train.resume=auto picks the latest checkpoint)")


if __name__ == "__main__":
    main()
