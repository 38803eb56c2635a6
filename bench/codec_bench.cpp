#include <thread>
// Codec speed on the CPU: encode and decode of one tile (one kv-head, 128 tokens, head_dim 128) per iteration,
// reported as MB/s of fp16 K/V input (2 x 128 x 128 x 2 bytes per tile); one thread and every thread.
#include "codec/synthetic_kv.h"
#include "codec/tile_codec.h"

#include <benchmark/benchmark.h>

namespace {

using kvarn::codec::TileCodec;

constexpr int kTokens = 128, kHeadDim = 128;
constexpr int64_t kFp16BytesPerTile = 2LL * kTokens * kHeadDim * 2;

TileCodec codec_for(const char* name) {
  const auto dtype = kvarn::codec::parse_cache_dtype(name);
  return TileCodec(dtype, kHeadDim, kTokens);
}

void BM_Encode(benchmark::State& state, const char* name) {
  const auto codec = codec_for(name);
  const auto kv = kvarn::codec::synthetic_kv({.tokens = kTokens, .head_dim = kHeadDim,
                                              .seed = static_cast<uint64_t>(state.thread_index() + 1)});
  std::vector<uint8_t> tile(codec.layout().bytes);
  for (auto _ : state) {
    codec.encode(kv.keys.data(), kv.values.data(), tile.data());
    benchmark::DoNotOptimize(tile.data());
  }
  state.SetBytesProcessed(state.iterations() * kFp16BytesPerTile);
}

void BM_Decode(benchmark::State& state, const char* name) {
  const auto codec = codec_for(name);
  const auto kv = kvarn::codec::synthetic_kv({.tokens = kTokens, .head_dim = kHeadDim, .seed = 7});
  std::vector<uint8_t> tile(codec.layout().bytes);
  codec.encode(kv.keys.data(), kv.values.data(), tile.data());
  std::vector<float> keys(kv.keys.size()), values(kv.values.size());
  for (auto _ : state) {
    codec.decode(tile.data(), keys.data(), values.data());
    benchmark::DoNotOptimize(keys.data());
  }
  state.SetBytesProcessed(state.iterations() * kFp16BytesPerTile);
}

}  // namespace

#define KVARN_CODEC_BENCH(fn, dtype) \
  BENCHMARK_CAPTURE(fn, dtype, #dtype)->ThreadRange(1, static_cast<int>(std::thread::hardware_concurrency()))->UseRealTime()

KVARN_CODEC_BENCH(BM_Encode, kvarn_k4v2_g128);
KVARN_CODEC_BENCH(BM_Encode, kvarn_k4v4_g128);
KVARN_CODEC_BENCH(BM_Encode, fp8_e4m3);
KVARN_CODEC_BENCH(BM_Decode, kvarn_k4v2_g128);
KVARN_CODEC_BENCH(BM_Decode, kvarn_k4v4_g128);
KVARN_CODEC_BENCH(BM_Decode, fp8_e4m3);

BENCHMARK_MAIN();
