"""The config matrix (bench/config_matrix.py): every cell of parallel x ep x router x data is either
refused by validation with one line naming the field, or trains 2 steps on 2 gloo processes with every
replicated weight identical across ranks afterwards. All 80 cells are validated here; a subset that
takes every parallel option with expert parallelism trains (the whole matrix: `python
bench/config_matrix.py`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.config_matrix import REPLICAS_OK, Cell, cells, make_data, refusal, train, verdict  # noqa: E402

GROUPS = ("model.", "data.", "parallel.", "optim.", "train.", "flow.")


def expected_refusal(cell: Cell) -> str | None:
    """The field each unsupported combination is refused for."""
    if cell.ep == 2 and cell.parallel == "single":
        return "parallel.ep=2 needs parallel.fsdp=true"
    if cell.ep == 2 and cell.router == "dense":
        return "parallel.ep=2 needs a MoE model"
    if cell.ep == 2 and cell.parallel == "deepspeed_zero3":
        return "parallel.ep=2 with parallel.zero_stage=3: ZeRO-3 would partition each rank's own experts"
    return None


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_data(tmp_path_factory.mktemp("matrix"))


def test_every_cell_validates_or_is_refused_naming_the_field(shards):
    seen = {}
    for cell in cells():
        why = refusal(cell, shards)
        want = expected_refusal(cell)
        if want is None:
            assert why is None, f"{cell.name}: refused: {why}"
        else:
            assert why is not None and why.startswith(want), f"{cell.name}: {why!r}, expected {want!r}"
            assert why.startswith(GROUPS) and "\n" not in why
        seen[cell.name] = why
    assert len(seen) == 80


SUBSET = [Cell("single", 1, "dense", "image"), Cell("fsdp", 2, "diffmoe", "latent"),
          Cell("fsdp_ep", 2, "expert_choice", "image"), Cell("deepspeed_zero2", 2, "token_choice", "latent"),
          Cell("deepspeed_zero3", 1, "diffmoe", "image")]


@pytest.mark.distributed
@pytest.mark.parametrize("cell", SUBSET, ids=lambda c: c.name)
def test_cell_trains_with_identical_replicas(cell, shards, tmp_path):
    proc = train(cell, shards, tmp_path / "run")
    assert verdict(proc) == "works", proc.stderr[-3000:]
    assert REPLICAS_OK in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("cell", [Cell("single", 2, "expert_choice", "latent"),
                                  Cell("deepspeed_zero3", 2, "token_choice", "image")], ids=lambda c: c.name)
def test_refused_cell_fails_on_the_command_line_in_one_line(cell, shards, tmp_path):
    proc = train(cell, shards, tmp_path / "run", timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0] == f"error: {refusal(cell, shards)}", proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {expected_refusal(cell)}")
    # the only traceback is torchrun's own report that a rank exited non-zero (exit code 2)
    assert all("ChildFailedError" in tb for tb in proc.stderr.split("Traceback")[1:]), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
