"""A real one-node slurm cluster on localhost for the whole session (tests/slurm/local_slurm.sh).

Skipped where slurm cannot be installed (not root, no apt-get), unless ECDIT_REQUIRE_SLURM=1 (CI sets
it), which turns that into a failure."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "local_slurm.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict:
    """Environment for slurm's commands (SLURM_CONF set); the cluster stops at the end of the session."""
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"local slurm did not start (exit {proc.returncode}): {proc.stderr[-2000:]}"
        if proc.returncode == 3 and os.environ.get("ECDIT_REQUIRE_SLURM") != "1":
            pytest.skip(message)
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True)
        pytest.fail(message)
    yield {"SLURM_CONF": str(state / "slurm.conf"), "state": str(state)}
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)
