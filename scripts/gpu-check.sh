#!/usr/bin/env bash
# The GPU check of issue #16 in one command: builds the nano models and a 7B-shaped Qwen2.5-VL with random
# weights (on the GPU, bf16, nothing downloaded), runs the hf policy, one KT / FI / DT-GRPO step each and
# batched evaluation, and prints one JSON line of figures (the last line of stdout). At most 8 minutes.
# Without CUDA (e.g. CUDA_VISIBLE_DEVICES="") the nano parts run on the CPU and the 7B parts say "no CUDA".
#
#   scripts/gpu-check.sh [--out DIR] [--budget-s 450] [--no-7b] [--rehearse-7b]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec timeout --signal=TERM --kill-after=10 480 "$PY" scripts/gpu_check.py "$@"
