#!/usr/bin/env bash
# Single node: NPROC processes (default: GPUs, else 2) through torchrun; arguments are Hydra overrides.
#   NPROC=8 bash launch/local.sh experiment=paper_xl_8e data.shards=...
# A worker that crashes, is killed or gives up on a stuck peer (parallel.timeout_s) restarts the worker
# group, which resumes from the latest checkpoint, up to MAX_RESTARTS times (default 3; 0: never).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
nproc="${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}" TORCH_NCCL_DUMP_ON_TIMEOUT=1
# A restarted worker group rendezvouses on a fresh store (the shared one keeps the last attempt's addresses).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-3}" \
  -m train "$@"
