#!/usr/bin/env bash
# Builds the CUDA targets with all cores, runs the CUDA kernel tests and benchmarks on the GPU of this machine,
# and prints the benchmark tables (the markdown of docs/benchmarks.md).
#   scripts/gpu-check.sh                 build in build/release, then run
#   BIN_DIR=.carry/bin scripts/gpu-check.sh   run prebuilt kvarn_cuda_tests / kvarn_cuda_bench from BIN_DIR
#   SANITIZE=1 scripts/gpu-check.sh      the tests under compute-sanitizer instead (memcheck on all of them,
#                                         racecheck and synccheck on each kernel's main cases), no benchmarks
# Environment: OUT_DIR (logs and CSVs, default build/gpu-check), QUICK=1 (one batch and context only),
# SKIP_TESTS=1, SHARDS (test processes at once, default 4), KVARN_SHARED (where tests find golden/, see
# tests/shared_dir.h).
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
# The tests in SHARDS processes at once (their float64 references take most of their time, on the CPU; 765 s in
# one process on the H200 machine, ~220 s in 4), each running "$@" --gtest_brief=1 into $OUT_DIR/<name>-<shard>.log;
# a shard that fails shows its log's end. A GPU test that finds no usable device fails rather than being skipped.
run_tests() {
  local name=$1 shards=${SHARDS:-4} pids=() i
  shift
  rm -f "$OUT_DIR/$name"-*.log
  for ((i = 0; i < shards; ++i)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i KVARN_REQUIRE_GPU=1 "$@" --gtest_brief=1 \
      > "$OUT_DIR/$name-$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < shards; ++i)); do
    wait "${pids[i]}" || { status=1; tail -n 40 "$OUT_DIR/$name-$i.log"; }
  done
  grep -hE "^\[  (PASSED|FAILED|SKIPPED) |ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/$name"-*.log |
    sort | uniq -c || true
}
if [[ "${SANITIZE:-0}" == 1 ]]; then
  sanitizer=("${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" --error-exitcode 1 --print-limit 20)
  [[ -x ${sanitizer[0]} ]] || { echo "gpu-check: no compute-sanitizer at ${sanitizer[0]} (set CUDA_HOME)" >&2; exit 1; }
  kernels='Dtypes/DecodeTest.MatchesFloat64ReferenceOnRaggedBatch/*:Dtypes/FlushTest.*:'
  kernels+='Dtypes/PrefillTest.MatchesFloat64ReferenceOnRaggedBatch/*:Dtypes/DequantizePrefixTest.*'
  run_tests memcheck "${sanitizer[@]}" --tool memcheck "$TESTS"
  for tool in racecheck synccheck; do
    SHARDS=1 run_tests "$tool" "${sanitizer[@]}" --tool "$tool" "$TESTS" --gtest_filter="$kernels"
  done
  exit $status
fi
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  run_tests tests "$TESTS"
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
