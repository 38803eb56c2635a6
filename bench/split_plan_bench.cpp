// The decode split planner's cost on the host, once per decode step (one plan serves every layer): a ragged batch
// of `batch` sequences, sequence s holding (s + 1) / batch of the longest's tiles (the ragged rows of
// kvarn_cuda_bench), on the H200's grid (132 SMs x 3 KVarN CTAs, 8 kv heads).
#include "backend/cuda/decode_split_plan.h"

#include <benchmark/benchmark.h>

#include <vector>

namespace {

void BM_PlanRaggedBatch(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0)), longest = static_cast<int>(state.range(1));
  std::vector<int> seq_tiles;
  for (int s = 0; s < batch; ++s) seq_tiles.push_back(static_cast<int>((longest + 1L) * (s + 1) / batch) - 1);
  const kvarn::cuda::DecodeGridShape grid{8, 3L * 132, 4, 132};
  for (auto _ : state) benchmark::DoNotOptimize(kvarn::cuda::choose_tiles_per_split(seq_tiles, grid));
}
BENCHMARK(BM_PlanRaggedBatch)
    ->ArgNames({"batch", "longest_tiles"})
    ->ArgsProduct({{8, 32, 128, 1024}, {63, 255, 1023}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
