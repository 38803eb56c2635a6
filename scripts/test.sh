#!/usr/bin/env bash
# Sets up, builds everything (CUDA code too when nvcc is present) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release
