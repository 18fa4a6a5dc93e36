#!/usr/bin/env bash
# The test command: installs if needed, then runs the whole suite (real Ray, Lance, vLLM, Pillow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_DEDUP_LOGS=0 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
