#!/usr/bin/env bash
# The GPU readiness suite (bench/gpu_suite.py) on the lent GPU machine (Python 3.12, torch 2.11): the
# carried wheels (WHEELS, default .whl/) go into a temporary site dir, the project runs from source
# (PYTHONPATH), and gpu_suite.json, gpu_suite.md and gpu_suite.log land in OUT (default bench/results/gpu).
#   bash bench/gpu.sh                 # all stages, each under its own time limit (<= 8 min in all)
#   bash bench/gpu.sh --dry-run       # every stage on CPU with tiny presets (what CI runs)
#   bash bench/gpu.sh --stages a c    # extra arguments go to bench/gpu_suite.py
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/bench/results/gpu}"
wheels="${WHEELS:-$root/.whl}"
py="${PYTHON:-python3}"
mkdir -p "$out"
site="$(mktemp -d "${TMPDIR:-/tmp}/ecdit-site.XXXXXX")"
if compgen -G "$wheels/*.whl" > /dev/null; then
  echo "[gpu.sh] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || { echo "[gpu.sh] wheel install failed" >&2; exit 1; }
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled DS_BUILD_OPS=0
cd "$root"
"$py" bench/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
