#!/usr/bin/env bash
# Compile check of every CUDA source (no GPU needed): nvcc -arch=sm_90 --fmad=false.
# Exits non-zero on the first failure. Usage: csrc/check_cuda_compile.sh [nvcc]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${1:-${NVCC:-nvcc}}"
out="$(mktemp -d /tmp/blip_cuda_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
status=0
for src in "$here"/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  if "$nvcc" -arch=sm_90 --fmad=false -std=c++17 -O3 -Werror all-warnings \
      -c "$src" -o "$out/$name.o"; then
    echo "ok   $src"
  else
    echo "FAIL $src" >&2
    status=1
  fi
done
exit "$status"
