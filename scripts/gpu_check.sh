#!/usr/bin/env bash
# The whole GPU-side check in one command that fits one device lease (<= 9 minutes on an H200):
#     OUT=/some/dir bash scripts/gpu_check.sh
# builds for the GPU at hand while a process pool warms Triton's cache, runs the GPU tests file by file
# under per-file budgets (every test reported, also when a file runs out of time), then the benchmarks
# (attn3d first), and packs everything into $OUT/gpu_check.tar.gz with a summary printed last. Steps,
# budgets and knobs: scripts/gpu_check.py. Needs a CUDA build of torch and triton already installed
# (no package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# one cache for the warm-up and the runs after it; under build/ so a warm machine keeps it between calls
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
exec "${PYTHON:-python3}" scripts/gpu_check.py
