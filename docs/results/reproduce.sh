#!/usr/bin/env bash
# Re-run the evaluation reports of docs/results/ (from the repository root, with ../shared/data/fas-dev
# beside the checkout and the shipped weights in assets/experts). Each command writes one folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/tarfas eval protocols/fas-dev/one-to-n-nuaa.yaml --analyses all --report docs/results/one-to-n-nuaa
.venv/bin/tarfas eval protocols/fas-dev/leave-one-out.yaml --report docs/results/leave-one-out
.venv/bin/tarfas eval protocols/fas-dev/per-domain.yaml --report docs/results/per-domain
