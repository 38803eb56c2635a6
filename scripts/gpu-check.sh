#!/usr/bin/env bash
# Builds the CUDA targets with all cores, runs the CUDA kernel tests and benchmarks on the GPU of this machine,
# and prints the benchmark tables (the markdown of docs/benchmarks.md).
#   scripts/gpu-check.sh                 build in build/release, then run
#   BIN_DIR=.carry/bin scripts/gpu-check.sh   run prebuilt kvarn_cuda_tests / kvarn_cuda_bench from BIN_DIR
# Environment: OUT_DIR (logs and CSVs, default build/gpu-check), QUICK=1 (one batch and context only),
# SKIP_TESTS=1, KVARN_SHARED (where tests find golden/, see tests/shared_dir.h).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-build/gpu-check}
mkdir -p "$OUT_DIR"
if [[ -z "${BIN_DIR:-}" ]]; then
  cmake --preset release
  cmake --build --preset release -j "$(nproc)" --target kvarn_cuda_tests kvarn_cuda_bench
  TESTS=build/release/tests/backend/cuda/kvarn_cuda_tests
  BENCH=build/release/bench/kvarn_cuda_bench
else
  TESTS=$BIN_DIR/kvarn_cuda_tests
  BENCH=$BIN_DIR/kvarn_cuda_bench
fi
# kvarn_cuda_bench times the linear layers of a decode step with cuBLAS, from the CUDA toolkit.
export LD_LIBRARY_PATH=${CUDA_HOME:-/usr/local/cuda}/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
quick=()
[[ "${QUICK:-0}" == 1 ]] && quick=(--quick)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT_DIR/gpu.txt"
status=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  # A GPU test that finds no usable device fails here rather than being skipped.
  KVARN_REQUIRE_GPU=1 "$TESTS" --gtest_brief=1 2>&1 | tee "$OUT_DIR/tests.log" || status=1
fi
# The SM clock beside the benchmarks (the H200 lowers it to hold its power cap): the report gives each decode
# row's median over its timed window.
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader -lms 100 \
  > "$OUT_DIR/clocks.csv" 2>/dev/null &
clock_log=$!
trap 'kill $clock_log 2>/dev/null || true' EXIT
"$BENCH" --csv "$OUT_DIR/kvarn.csv" "${quick[@]}" 2>&1 | tee "$OUT_DIR/bench.log" || status=1
python3 bench/sdpa_bench.py --csv "$OUT_DIR/sdpa.csv" "${quick[@]}" 2>&1 | tee "$OUT_DIR/sdpa.log" || status=1
kill $clock_log 2>/dev/null || true
python3 bench/report.py "$OUT_DIR/kvarn.csv" "$OUT_DIR/sdpa.csv" "$OUT_DIR/clocks.csv" | tee "$OUT_DIR/report.md"
exit $status
