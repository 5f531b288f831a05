#!/usr/bin/env bash
# The GPU readiness suite (bench/gpu_suite.py) on the lent GPU machine (Python 3.12, torch 2.11): the
# carried wheels (WHEELS, default .whl/) go into a temporary site dir, the project is installed into the
# interpreter's environment with `pip install --no-deps -e .` (its torch stays; the build's setuptools
# comes from WHEELS) unless this checkout is installed there already, or else runs from source
# (PYTHONPATH); gpu_suite.json, gpu_suite.md and gpu_suite.log land in OUT (default bench/results/gpu).
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
installed_here() {  # this checkout is the interpreter's installed ecdit (pip's direct_url.json)
  "$py" -I - "$root" <<'EOF' 2>/dev/null  # -I: not an ecdit.egg-info in the current dir
import json, sys
from importlib.metadata import distribution
from pathlib import Path
url = json.loads(distribution("ecdit").read_text("direct_url.json") or "{}").get("url", "")
sys.exit(0 if url == Path(sys.argv[1]).resolve().as_uri() else 1)
EOF
}
project="$root:"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[gpu.sh] $("$py" -V) is older than the project's requires-python (>=3.11): running from source"
elif installed_here; then
  echo "[gpu.sh] the project is installed from $root already"; project=""
elif "$py" -m pip install -q --no-deps --no-index --find-links "$wheels" -e "$root"; then
  echo "[gpu.sh] installed the project: pip install --no-deps -e $root"; project=""
else
  echo "[gpu.sh] pip install --no-deps -e $root failed (setuptools not in $wheels?): running from source" >&2
fi
export PYTHONPATH="$project$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled DS_BUILD_OPS=0
cd "$root"
"$py" bench/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
