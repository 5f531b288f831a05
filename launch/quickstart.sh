#!/usr/bin/env bash
# README main job. Until the training app lands (issue: training app) this sets up the environment and
# prints what the full job will do, then checks the model end to end with a short CPU training run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
cat <<'MSG'
[quickstart] The full main job will: generate the embedded shapes dataset into WebDataset shards, encode
captions with the offline MiniLM text encoder, and train a small EC-DiT with 2 processes (expert
parallel 2) for a few minutes, writing checkpoints, a wandb offline run and a sample grid.
[quickstart] The training app is not in yet; running the model's own CPU smoke run instead:
MSG
exec .venv/bin/python -m train.smoke "$@"
