#!/usr/bin/env bash
# The project's test command (README): sets up ./.venv if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/model -x`.
# A pytest that ends without finishing its session (a test that exec'd or killed the process) fails here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
done_file="$(mktemp)"
rm -f "$done_file"
export ECDIT_PYTEST_DONE="$done_file"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [[ ! -s "$done_file" ]]; then
  echo "error: pytest ended (exit $rc) without finishing its session: a test replaced or killed the process" >&2
  exit 1
fi
rm -f "$done_file"
exit "$rc"
