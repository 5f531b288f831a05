#!/usr/bin/env bash
# One node of a multi-node torchrun job (run it on every node, with its NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 NPROC=8 bash launch/multinode_torchrun.sh [overrides]
# All nodes must see the same train.run_dir (shared filesystem) for checkpoints and resume.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
nproc="${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
exec "$py" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" -m train "$@"
