#!/usr/bin/env bash
# The GPU proof in one command (benchmarks/gpu_proof.py): bash benchmarks/gpu_proof.sh --out DIR [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_proof.py "$@"
