#!/usr/bin/env bash
# Sets up, builds the release preset and runs kvarn on its default: capacity planning for Llama-3-8B on an 80 GB
# budget, then the codec evaluated on the real captured K/V of ../shared (and synthetic outlier K/V).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target kvarn
SHARED=${KVARN_SHARED:-../shared}
build/release/src/cli/kvarn capacity --shape llama-3-8b --memory-gb 80 --max-num-seqs 8
build/release/src/cli/kvarn codec-eval --capture "$SHARED/golden/kvarn-test-lm/kv_capture.safetensors" --synthetic
