#!/usr/bin/env bash
# One node of a multi-node torchrun job (run it on every node, with its NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 NPROC=8 bash launch/multinode_torchrun.sh [overrides]
# All nodes must see the same train.run_dir (shared filesystem) for checkpoints and resume. c10d rendezvous on
# MASTER_ADDR:MASTER_PORT (RDZV_ID: a name shared by the nodes of this run): a failed worker restarts the
# worker group on every node, resuming from the latest checkpoint, up to MAX_RESTARTS times (default 3);
# ranks are assigned by the rendezvous (NODE_RANK only orders the log). NNODES=MIN:MAX (e.g. 1:2) lets the
# group go on with the nodes that are left when one is lost, and take a node back when it rejoins.
# Network: gloo and NCCL bind to the interface of the route to MASTER_ADDR, or SOCKET_IFNAME (GLOO_SOCKET_IFNAME
# and NCCL_SOCKET_IFNAME, when set, win); the node that holds MASTER_ADDR hosts the rendezvous. The other nodes
# wait at most INIT_TIMEOUT seconds (default 600) for it to answer, and the rendezvous for all nodes to join;
# RDZV_CONF adds torchrun rendezvous options (e.g. last_call_timeout=5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
port="${MASTER_PORT:-29500}" init_timeout="${INIT_TIMEOUT:-600}"
net="$("$py" "$root/launch/node_net.py" "$MASTER_ADDR" "$port" --timeout "$init_timeout" \
  ${SOCKET_IFNAME:+--ifname "$SOCKET_IFNAME"})" || exit 2
read -r ifname local_addr is_host <<< "$net"
nproc="${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ifname}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}" TORCH_NCCL_DUMP_ON_TIMEOUT=1
# A restarted worker group rendezvouses on a fresh store (the shared one keeps the last attempt's addresses).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "[launch] node $NODE_RANK of $NNODES: $nproc processes on $local_addr ($ifname), rendezvous" \
  "$MASTER_ADDR:$port$([ "$is_host" = true ] && echo ' (hosted here)')" >&2
exec "$py" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$nproc" --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$port" --rdzv-id="${RDZV_ID:-ecdit}" --local-addr="$local_addr" \
  --rdzv-conf="$([ "$is_host" = auto ] || echo "is_host=$is_host,")join_timeout=$init_timeout${RDZV_CONF:+,$RDZV_CONF}" \
  --max-restarts="${MAX_RESTARTS:-3}" -m train "$@"
