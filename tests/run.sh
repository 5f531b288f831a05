#!/usr/bin/env bash
# The project's test command (README): sets up ./.venv if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/model -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m pytest "$@"
