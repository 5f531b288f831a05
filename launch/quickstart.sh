#!/usr/bin/env bash
# README main job: set up ./.venv, generate the embedded shapes dataset, and train a small EC-DiT with
# 2 processes and expert parallelism 2 (torchrun, gloo on CPU) for a few minutes. Writes checkpoints, a
# wandb offline run, metrics.jsonl, a sample grid and the expert-count heatmap under runs/cpu-small/, then
# scores the final checkpoint with the shapes scorer (runs/cpu-small/eval/eval.json, grid.png).
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
# Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
if [[ ! -f runs/shapes/shapes-000003.tar ]]; then
  echo "[quickstart] generating the shapes dataset (4000 images, 4 shards) into runs/shapes/"
  .venv/bin/python -m data.synthetic --out runs/shapes --num-samples 4000 --shard-size 1000
fi
run_dir=runs/cpu-small
for arg in "$@"; do
  case "$arg" in
    train.name=*) run_dir="runs/${arg#*=}" ;;
    train.run_dir=*) run_dir="${arg#*=}" ;;
  esac
done
echo "[quickstart] training: torchrun --standalone --nproc_per_node=2 -m train experiment=cpu_small $*"
.venv/bin/torchrun --standalone --nproc_per_node=2 -m train experiment=cpu_small "$@"
echo "[quickstart] scoring the final checkpoint on 24 in-distribution prompts (data/scorer.py; chance is 0.03 strict, 0.23 partial)"
.venv/bin/python -m train.evaluate --checkpoint "$run_dir/checkpoints" --split train --num-prompts 24 --steps 10 --out "$run_dir/eval"
