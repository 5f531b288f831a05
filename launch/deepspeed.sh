#!/usr/bin/env bash
# DeepSpeed launcher over a hostfile (`host slots=N` per line):
#   HOSTFILE=hosts NUM_GPUS=8 bash launch/deepspeed.sh parallel=deepspeed_zero2 [overrides]
# The launcher appends --local_rank=N, which train/__main__.py strips before Hydra parses.
# NOTE: the Hydra trainer drives FSDP2 + expert parallelism; parallel.engine=deepspeed is validated
# but the ZeRO engine is run through parallel/deepspeed.py (build_engine / train_step) and is not yet
# wired into train/trainer.py (it stops with a clear message).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
args=()
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/deepspeed" "${args[@]}" --num_gpus "${NUM_GPUS:-2}" train/__main__.py "$@"
