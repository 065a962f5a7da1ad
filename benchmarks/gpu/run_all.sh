#!/usr/bin/env bash
# One-shot GPU check: build for this card, op tests on CUDA, kernel benchmarks, a short
# `blip train --device cuda`. Usage: benchmarks/gpu/run_all.sh OUT_DIR [--dry-run]
# (--dry-run: the CPU rehearsal). Details and the device command: benchmarks/gpu/README.md.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT_DIR [--dry-run] [--budget SECONDS] [--only STEP,...]" >&2
  exit 2
fi
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" benchmarks/gpu/run_all.py "$@"
