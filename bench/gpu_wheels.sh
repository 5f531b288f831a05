#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the cp312 wheels that bench/gpu.sh installs on the GPU machine, where
# Python 3.12 and torch 2.11 are installed but these packages are not (list in docs/performance.md):
# the project's dependencies at the versions pip would choose there (megatron-core 0.19 on Python 3.12),
# and setuptools, which `pip install --no-deps -e .` builds the project with.
# Then, on the device tool: run "bash bench/gpu.sh" with carry [".whl"].
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 megatron-core==0.19.2 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 setuptools==84.2.1
# No wheels on PyPI for these two (pure Python): build them here.
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -1
