#!/usr/bin/env bash
# DeepSpeed launcher over a hostfile (`host slots=N` per line):
#   HOSTFILE=hosts NUM_GPUS=8 bash launch/deepspeed.sh parallel=deepspeed_zero2 [overrides]
# The launcher appends --local_rank=N, which train/__main__.py strips before Hydra parses.
# Under slurm use `LAUNCHER=deepspeed sbatch launch/slurm/train.sbatch ...` (no hostfile or ssh needed).
# parallel=deepspeed_zero2|deepspeed_zero3: DeepSpeed owns optimizer (AdamW), warmup schedule, clipping
# and accumulation; the trainer keeps the EMA (train/backends.py). ZeRO-2 takes expert parallelism too
# (parallel.ep=N: DeepSpeed's MoE groups, parallel/deepspeed.py); ZeRO-3 refuses it. Without GPUs DeepSpeed
# uses its CPU accelerator (gloo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
args=()
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/deepspeed" "${args[@]}" --num_gpus "${NUM_GPUS:-2}" train/__main__.py "$@"
