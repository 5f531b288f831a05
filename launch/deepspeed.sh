#!/usr/bin/env bash
# DeepSpeed launcher over a hostfile (`host slots=N` per line):
#   HOSTFILE=hosts NUM_GPUS=8 bash launch/deepspeed.sh parallel=deepspeed_zero2 [overrides]
# Several nodes without ssh or pdsh (DeepSpeed's --no_ssh): on every node, with the same arguments,
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 NUM_GPUS=8 bash launch/deepspeed.sh parallel=deepspeed_zero2 ...
# where each node starts its own NUM_GPUS processes and rank 0's process hosts the store on MASTER_ADDR:
# MASTER_PORT (default 29500); the network as in launch/multinode_torchrun.sh (SOCKET_IFNAME, INIT_TIMEOUT:
# the other nodes wait for rank 0's store, then stop with one line naming the address). No restarts: a lost
# node ends the job (use launch/multinode_torchrun.sh, or slurm's requeue, for that).
# The launcher appends --local_rank=N, which train/__main__.py strips before Hydra parses.
# Under slurm use `LAUNCHER=deepspeed sbatch launch/slurm/train.sbatch ...` (no hostfile or ssh needed).
# parallel=deepspeed_zero2|deepspeed_zero3: DeepSpeed owns optimizer (AdamW), warmup schedule, clipping
# and accumulation; the trainer keeps the EMA (train/backends.py). ZeRO-2 takes expert parallelism too
# (parallel.ep=N: DeepSpeed's MoE groups, parallel/deepspeed.py); ZeRO-3 refuses it. Without GPUs DeepSpeed
# uses its CPU accelerator (gloo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
args=()
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
export HF_HUB_OFFLINE=1
if [[ -n "${NODE_RANK:-}" ]]; then
  : "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
  port="${MASTER_PORT:-29500}"
  net="$("$py" "$root/launch/node_net.py" "$MASTER_ADDR" "$port" --timeout "${INIT_TIMEOUT:-600}" \
    ${SOCKET_IFNAME:+--ifname "$SOCKET_IFNAME"})" || exit 2
  read -r ifname local_addr is_host <<< "$net"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ifname}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
  if [[ -z "${HOSTFILE:-}" ]]; then  # the nodes' names only label the slots: nothing connects to them
    hostfile="$(mktemp)"
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=${NUM_GPUS:-2}"; done > "$hostfile"
    args+=(--hostfile "$hostfile")
  fi
  args+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$port")
  echo "[launch] node $NODE_RANK of $NNODES: ${NUM_GPUS:-2} processes on $local_addr ($ifname), store" \
    "$MASTER_ADDR:$port" >&2
fi
exec "$root/.venv/bin/deepspeed" "${args[@]}" --num_gpus "${NUM_GPUS:-2}" train/__main__.py "$@"
