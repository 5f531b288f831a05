"""The package's metadata as pip sees it: the wheel built from this checkout (METADATA: Python range, no
pinned torch, megatron-core by Python version, the extras) and an install of the project into the set-up
venv, which must leave its torch alone."""

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from model.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "parallel", "data", "train", "bench", "launch")


def build_wheel(src: Path, out: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the project (pyproject.toml, README.md and
    the packages: the build writes build/ and *.egg-info next to its sources)."""
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("ecdit-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return build_wheel(tmp / "src", tmp / "dist")


def metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(z.read(name).decode())


def requirements(meta) -> list[Requirement]:
    return [Requirement(line) for line in meta.get_all("Requires-Dist")]


def wanted(reqs: list[Requirement], python: str, extra: str = "") -> dict[str, Requirement]:
    """name -> requirement, of those whose marker holds for this Python version and extra."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": extra}
    return {r.name: r for r in reqs if r.marker is None or r.marker.evaluate(env)}


def test_wheel_metadata_python_range_torch_range_and_extras(wheel):
    meta = metadata(wheel)
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier")
    assert {f"Programming Language :: Python :: 3.{m}" for m in (11, 12, 13)} <= set(classifiers)
    reqs = requirements(meta)
    core = wanted(reqs, "3.12")
    torch = core["torch"]
    assert all(s.operator != "==" for s in torch.specifier), torch  # no pinned torch
    assert Version("2.11.0") in torch.specifier and Version("2.13.0") in torch.specifier
    assert Version("2.10.0") not in torch.specifier and Version("3.0") in torch.specifier, torch  # no upper pin
    pinned = [str(r) for r in core.values() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == [], pinned
    assert {"deepspeed", "megatron-core", "wandb", "matplotlib", "pytest"}.isdisjoint(core)  # extras only
    assert set(meta.get_all("Provides-Extra")) >= {*EXTRAS, "all", "dev", "fid"}


def test_wheel_metadata_megatron_core_by_python_version(wheel):
    reqs = requirements(metadata(wheel))
    for python, inside, outside in (("3.11", "0.16.1", "0.19.2"), ("3.12", "0.19.2", "0.16.1"),
                                    ("3.13", "0.19.5", "0.20.0")):
        (req,) = [r for r in wanted(reqs, python, "megatron").values() if r.name == "megatron-core"]
        assert Version(inside) in req.specifier and Version(outside) not in req.specifier, (python, str(req))


def test_wheel_extras_all_and_dev_cover_every_extra(wheel):
    reqs = requirements(metadata(wheel))
    for extra, (module, _) in EXTRAS.items():
        own = set(wanted(reqs, "3.11", extra)) - set(wanted(reqs, "3.11"))
        assert own, f"extra {extra} adds nothing"
    for umbrella in ("all", "dev"):
        (self_req,) = [r for r in wanted(reqs, "3.11", umbrella).values() if r.name == "ecdit"]
        included = set(self_req.extras)
        if umbrella == "dev":
            assert included == {"all"}
        else:
            assert included == set(EXTRAS), included


def test_wheel_holds_the_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("model/dit.py", "parallel/megatron_dispatch.py", "train/trainer.py", "model/extras.py",
                 "data/synthetic.py", "bench/gpu_suite.py"):
        assert path in names, path


def test_constraints_pin_exactly_what_the_extras_name():
    """launch/constraints.txt pins torch 2.13.0 and every requirement of `.[dev]` exactly (the CPU set-up)."""
    pins = {}
    for line in (ROOT / "launch/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *(r for k, v in project["optional-dependencies"].items()
                                         if k in (*EXTRAS, "dev") for r in v)]
    env = {"python_version": "3.11", "python_full_version": "3.11.0", "extra": ""}
    for line in names:
        req = Requirement(line)
        if req.name == "ecdit" or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in launch/constraints.txt"
        assert Version(pins[name]) in req.specifier, (name, pins[name], str(req))


def test_installing_the_project_leaves_the_venvs_torch_alone(tmp_path):
    """What pip would do to the set-up venv for `pip install -e .[dev]` without the constraints file:
    nothing but the project itself (its torch, 2.13.0+cpu, satisfies the range; offline, no build
    isolation). A dry run with a report: nothing is installed."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "-q", "--report", str(report), "-e", f"{ROOT}[dev]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    install = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert install == {"ecdit": "0.1.0"}, install
    import torch
    assert torch.__version__.startswith("2.13.0")
