"""A missing extra is refused with one line naming it (a `None` entry in sys.modules stands for a package
that is not installed)."""

import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from model import extras
from model.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def run_without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `module` cannot be imported."""
    prog = f"import sys; sys.modules[{module!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_extra_is_declared_in_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(declared)
    assert all(extras.installed(name) for name in extras.EXTRAS)  # the CPU set-up installs every extra


def test_deepspeed_engine_without_deepspeed_names_the_extra():
    proc = run_without("deepspeed", "import parallel.deepspeed")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "model.extras.MissingExtra: parallel.engine=deepspeed needs DeepSpeed: pip install 'ecdit[deepspeed]'")


def test_megatron_dispatcher_without_megatron_names_the_extra():
    code = ("from types import SimpleNamespace\nfrom parallel.megatron_dispatch import MegatronDispatcher\n"
            "MegatronDispatcher(SimpleNamespace(ndim=1), 'allgather')")
    proc = run_without("megatron", code)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("model.extras.MissingExtra: parallel.dispatcher=megatron_allgather"
                                                    " needs megatron-core: pip install 'ecdit[megatron]'")


def test_metrics_without_wandb_say_so_in_one_line_and_keep_the_jsonl(tmp_path, monkeypatch, capsys):
    from train.metrics import Metrics
    monkeypatch.setitem(sys.modules, "wandb", None)
    m = Metrics(tmp_path, {}, enabled=True, wandb_mode="offline")
    m.log({"loss": 1.0}, step=1)
    assert m.run is None and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    err = capsys.readouterr().err
    assert err == "[metrics] train.wandb_mode=offline needs wandb: pip install 'ecdit[wandb]' (metrics.jsonl only)\n"


def test_study_without_matplotlib_refuses_before_training(tmp_path, monkeypatch, capsys):
    from bench import study
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert study.main(["--out", str(tmp_path / "study")]) == 2
    assert capsys.readouterr().err == "error: bench/study.py needs matplotlib: pip install 'ecdit[study]'\n"
    assert not (tmp_path / "study").exists()


def cfg(engine="fsdp", dispatcher="alltoall", wandb_mode="offline"):
    return SimpleNamespace(parallel=SimpleNamespace(engine=engine, dispatcher=dispatcher),
                           train=SimpleNamespace(wandb_mode=wandb_mode))


def test_check_refuses_the_first_missing_extra_a_config_uses(monkeypatch):
    assert extras.needed(cfg()) == []
    full = cfg("deepspeed", "megatron_alltoall", "online")
    assert [e for e, _ in extras.needed(full)] == ["deepspeed", "megatron"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    extras.check(full)  # all installed here
    monkeypatch.setitem(sys.modules, "megatron", None)
    with pytest.raises(ConfigError) as e:
        extras.check(full)
    assert str(e.value) == "parallel.dispatcher=megatron_alltoall needs megatron-core: pip install 'ecdit[megatron]'"
    assert e.value.field == "parallel.dispatcher" and isinstance(e.value, extras.MissingExtra)
    extras.check(cfg("deepspeed"))  # megatron is not needed there


def test_train_without_deepspeed_refuses_the_engine_up_front(tmp_path):
    """`python -m train parallel=deepspeed_zero2` on a core install: one `error:` line from validation, before
    any process group, model or data exists."""
    code = ("import sys; sys.argv = ['train', 'parallel=deepspeed_zero2', 'train.run_dir=" + str(tmp_path / "run")
            + "']\nfrom train.__main__ import main\nmain()")
    proc = run_without("deepspeed", code)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: parallel.engine=deepspeed needs DeepSpeed: pip install 'ecdit[deepspeed]'")
    assert not {"metrics.jsonl", "wandb", "checkpoints"} & {p.name for p in (tmp_path / "run").iterdir()}
