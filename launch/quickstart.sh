#!/usr/bin/env bash
# README main job: set up ./.venv, generate the quickstart's shapes set (16x16, one object or a count of one
# kind; a set of another mix in its place is refused, naming the setting that differs), and train a small
# EC-DiT with 2 processes and expert parallelism 2 (torchrun, gloo on CPU) for about 6 minutes. Writes
# checkpoints, a wandb offline run, metrics.jsonl, a sample grid and the expert-count heatmap under
# runs/cpu-small/, then scores the final checkpoint with the shapes scorer on in-distribution prompts
# (runs/cpu-small/eval/eval.json, grid.png).
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
# Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
data=runs/shapes-quickstart
echo "[quickstart] the quickstart's shapes set (4000 images of 16x16, 4 shards) in $data/ (complete shards are kept)"
.venv/bin/python -m data.synthetic --out "$data" --mix quickstart --num-samples 4000 --shard-size 1000
run_dir=runs/cpu-small
for arg in "$@"; do
  case "$arg" in
    train.name=*) run_dir="runs/${arg#*=}" ;;
    train.run_dir=*) run_dir="${arg#*=}" ;;
  esac
done
echo "[quickstart] training: torchrun --standalone --nproc_per_node=2 -m train experiment=cpu_small $*"
.venv/bin/torchrun --standalone --nproc_per_node=2 -m train experiment=cpu_small "$@"
echo "[quickstart] scoring the final checkpoint on 32 in-distribution prompts (data/scorer.py; chance for this set: 0.02 strict, 0.14 partial)"
.venv/bin/python -m train.evaluate --checkpoint "$run_dir/checkpoints" --split train --shapes-dir "$data" \
  --num-prompts 32 --steps 20 --out "$run_dir/eval"
