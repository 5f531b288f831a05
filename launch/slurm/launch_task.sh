#!/usr/bin/env bash
# One launcher per slurm task (run by `srun` from train.sbatch): the job step's tasks are the "nodes" of
# the run, so `--nodes=N --ntasks-per-node=1` gives N nodes of NPROC_PER_NODE processes each, and
# `--ntasks-per-node=2` puts two of them on one machine.
#   LAUNCHER=torchrun (default): python -m torch.distributed.run ... -m train OVERRIDES
#                                (-m $MODULE ARGS with MODULE set: precompute.sbatch runs data.precompute).
#                                c10d rendezvous on MASTER_ADDR:MASTER_PORT (id: the job id) over
#                                SLURM_NTASKS nodes, so that a failed worker restarts the worker group
#                                on every node, up to MAX_RESTARTS times (default 3; 0: never); ranks
#                                are assigned by the rendezvous.
#   LAUNCHER=deepspeed:          the deepspeed launcher without ssh (--no_ssh, one per task) over a
#                                generated hostfile of SLURM_NTASKS entries, running train/__main__.py
# LAUNCH_DRY_RUN=1 prints the command instead of running it.
#
# SIGUSR1 is ignored here, before exec: torchrun and the deepspeed launcher would die of it (neither
# handles it), while the trainer processes install their own handler (checkpoint, then exit 0).
set -euo pipefail
trap '' USR1

: "${SLURM_NTASKS:?run under srun}" "${SLURM_PROCID:?run under srun}" "${SLURM_JOB_ID:?run under srun}"
: "${MASTER_ADDR:?set MASTER_ADDR (train.sbatch sets the first node of the job)}"
: "${MASTER_PORT:?set MASTER_PORT}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}"
py="${PYTHON:-.venv/bin/python}"
launcher="${LAUNCHER:-torchrun}"

case "$launcher" in
  torchrun)
    cmd=("$py" -m torch.distributed.run --nnodes="$SLURM_NTASKS" --nproc_per_node="$NPROC_PER_NODE"
         --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
         --max-restarts="${MAX_RESTARTS:-3}" -m "${MODULE:-train}" "$@")
    ;;
  deepspeed)
    hostfile="${TMPDIR:-/tmp}/ecdit-hostfile-${SLURM_JOB_ID}-${SLURM_PROCID}"
    for ((i = 0; i < SLURM_NTASKS; i++)); do echo "task$i slots=$NPROC_PER_NODE"; done >"$hostfile"
    cmd=("$py" -m deepspeed.launcher.runner --no_ssh --hostfile="$hostfile" --node_rank="$SLURM_PROCID"
         --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" train/__main__.py "$@")
    ;;
  *)
    echo "error: LAUNCHER=$launcher must be torchrun or deepspeed" >&2
    exit 2
    ;;
esac

if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
