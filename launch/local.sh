#!/usr/bin/env bash
# Single node: NPROC processes (default: GPUs, else 2) through torchrun; arguments are Hydra overrides.
#   NPROC=8 bash launch/local.sh experiment=paper_xl_8e data.shards=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
nproc="${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m train "$@"
