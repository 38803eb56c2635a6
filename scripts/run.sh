#!/usr/bin/env bash
# Sets up, builds the release preset and runs kvarn on its default: text generation with the model in $MODEL
# (default ../shared/models/stories260K) through a KVarN cache, then capacity planning for Llama-3-8B on 80 GB and
# the codec on the real captured K/V of ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target kvarn
SHARED=${KVARN_SHARED:-../shared}
MODEL=${MODEL:-$SHARED/models/stories260K}
build/release/src/cli/kvarn generate "$MODEL" -p "Once upon a time" --max-tokens 200 --temperature 0 \
  --kv-cache-dtype kvarn_k4v2_g128
build/release/src/cli/kvarn capacity --shape llama-3-8b --memory-gb 80 --max-num-seqs 8
build/release/src/cli/kvarn codec-eval --capture "$SHARED/golden/kvarn-test-lm/kv_capture.safetensors" --synthetic
