# Sourced by the sbatch scripts (from the repository root): processes per node, the rendezvous address
# and the thread/offline settings every task inherits.
#   NPROC_PER_NODE  processes per task (default: the GPUs per node of the allocation)
#   MASTER_ADDR     the first node of the job; MASTER_PORT: 20000 + job id % 20000 unless set
gpus="${SLURM_GPUS_PER_NODE:-0}"
gpus="${gpus##*:}"  # "a100:8" -> 8
export NPROC_PER_NODE="${NPROC_PER_NODE:-$gpus}"
if [[ "$NPROC_PER_NODE" -lt 1 ]]; then
  echo "error: no GPUs per node in the allocation: set NPROC_PER_NODE (e.g. NPROC_PER_NODE=2 for CPU nodes)" >&2
  exit 2
fi
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" HF_HUB_OFFLINE=1
# NCCL's flight recorder, dumped on a collective timeout (the trainer points the dump into RUN_DIR/comm_trace).
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}" TORCH_NCCL_DUMP_ON_TIMEOUT=1
# A restarted worker group rendezvouses on a fresh store (the shared one keeps the last attempt's addresses).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
