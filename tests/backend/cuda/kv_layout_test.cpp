// The cache layer's checks: make_kv_cache_layer refuses what the CUDA kernels do not serve, and check_kv_cache_layer,
// which every kernel entry point makes first (a KvCacheLayer is a plain struct), refuses a layer make_kv_cache_layer
// could not have built; check_device_memory refuses null and misaligned arrays. All throw before anything is
// launched, and the arrays are never read (the aligned addresses below are not device memory), so these tests run
// without a GPU.
#include "backend/cuda/append_to_tails.h"
#include "backend/cuda/decode_attention.h"
#include "backend/cuda/dequantize_prefix.h"
#include "backend/cuda/flush_full_tiles.h"
#include "backend/cuda/kv_layout.h"
#include "backend/cuda/prefill_attention.h"
#include "codec/cache_dtype.h"
#include "cuda_test_support.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kvarn::cuda {
namespace {

using test::fake_device_address;
using test::refused_with;

KvCacheLayer layer(const char* dtype, int head_dim = 128, int tile_tokens = 128, int kv_heads = 2) {
  return make_kv_cache_layer(codec::parse_cache_dtype(dtype), head_dim, tile_tokens, kv_heads, nullptr, nullptr);
}

TEST(MakeKvCacheLayer, RefusesWhatTheKernelsDoNotServe) {
  const codec::CacheDtype two_bit_keys{"kvarn_k2v2_g128", codec::Method::kvarn, 2, 2, 128};
  const struct {
    codec::CacheDtype dtype;
    int head_dim, tile_tokens, kv_heads;
    const char* expected;
  } cases[] = {
      {codec::parse_cache_dtype("fp16"), 96, 128, 2, "head_dim 96 is not supported; expected 64 or 128"},
      {codec::parse_cache_dtype("fp16"), 128, 32, 2, "block size 32 is not supported; expected 64 or 128"},
      {codec::parse_cache_dtype("fp16"), 128, 128, 0, "num_kv_heads 0 must be positive"},
      {codec::parse_cache_dtype("kvarn_k4v2_g64"), 128, 128, 2,
       "block size 128 does not match kvarn_k4v2_g64, whose tiles hold 64 tokens"},
      {two_bit_keys, 128, 128, 2, "kvarn_k2v2_g128 has 2-bit keys and 2-bit values; the kernels serve 4-bit keys"},
      {codec::parse_cache_dtype("fp8_e4m3"), 128, 128, 2, "cache dtype fp8_e4m3 is not served by the CUDA backend"},
      {codec::parse_cache_dtype("fp32"), 128, 128, 2, "cache dtype fp32 is not served by the CUDA backend"},
  };
  for (const auto& c : cases)
    EXPECT_THAT([&] { make_kv_cache_layer(c.dtype, c.head_dim, c.tile_tokens, c.kv_heads, nullptr, nullptr); },
                refused_with(c.expected));
}

TEST(CheckKvCacheLayer, AcceptsEveryLayerMakeKvCacheLayerBuilds) {
  int built = 0;
  for (const std::string& name : codec::cache_dtype_names()) {
    const codec::CacheDtype dtype = codec::parse_cache_dtype(name);
    if (dtype.method == codec::Method::fp32 || dtype.method == codec::Method::fp8_e4m3) continue;
    for (const int d : {64, 128})
      for (const int g : {64, 128}) {
        if (dtype.code_tile() && g != dtype.tile_tokens) continue;
        for (const int kv_heads : {1, 8}) {
          const KvCacheLayer cache = make_kv_cache_layer(dtype, d, g, kv_heads, fake_device_address<uint8_t>(),
                                                         fake_device_address<uint16_t>(16));
          EXPECT_NO_THROW(check_kv_cache_layer(cache, "test")) << name << " D " << d << " G " << g;
          ++built;
        }
      }
  }
  EXPECT_EQ(built, 2 * 2 * 2 + 6 * 2 * 2);  // fp16 at both block sizes, the 6 code dtypes at their own
}

TEST(CheckKvCacheLayer, RefusesALayerMakeKvCacheLayerCouldNotHaveBuilt) {
  using Change = std::function<void(KvCacheLayer&)>;
  const struct {
    const char* dtype;
    Change change;
    const char* expected;
  } cases[] = {
      {"fp16", [](KvCacheLayer& c) { c.num_kv_heads = 0; }, "who: cache.num_kv_heads 0; expected > 0"},
      {"fp16", [](KvCacheLayer& c) { c.num_kv_heads = -2; }, "who: cache.num_kv_heads -2; expected > 0"},
      {"fp16", [](KvCacheLayer& c) { c.layout.head_dim = 96; }, "who: cache.layout.head_dim 96; expected 64 or 128"},
      {"kvarn_k4v2_g128", [](KvCacheLayer& c) { c.layout.tokens = 32; },
       "who: cache.layout.tokens 32; expected 64 or 128"},
      {"fp16", [](KvCacheLayer& c) { c.method = codec::Method::fp8_e4m3; },
       "who: cache.method fp8_e4m3; expected fp16, rtn, rot or kvarn"},
      {"fp16", [](KvCacheLayer& c) { c.method = codec::Method::kvarn; },
       "who: cache.method kvarn with cache.layout.code_tile false; expected code tiles for rtn, rot and kvarn"},
      {"rtn_k4v2_g128", [](KvCacheLayer& c) { c.method = codec::Method::fp16; },
       "who: cache.method fp16 with cache.layout.code_tile true"},
      {"kvarn_k4v2_g128", [](KvCacheLayer& c) { c.layout = codec::TileLayout::codes(128, 128, 4, 3); },
       "who: cache.layout of 4-bit keys, 3-bit values and 15872 bytes differs from TileLayout::codes(128, 128, 4, 2 "
       "or 4); expected the layout make_kv_cache_layer builds"},
      {"kvarn_k4v2_g128", [](KvCacheLayer& c) { c.layout.head_dim = 64; },  // the offsets left at D = 128's
       "differs from TileLayout::codes(64, 128, 4, 2 or 4)"},
      {"fp16", [](KvCacheLayer& c) { c.layout = codec::TileLayout::plain(128, 128, 8); },
       "who: cache.layout of 8-bit keys, 8-bit values and 32768 bytes differs from TileLayout::plain(128, 128, 16)"},
      {"fp16", [](KvCacheLayer& c) { c.blocks = fake_device_address<uint8_t>(8); },
       "who: cache.blocks at 0x10008 is not 16-byte aligned"},
      {"fp16", [](KvCacheLayer& c) { c.tails = fake_device_address<uint16_t>(2); },
       "who: cache.tails at 0x10002 is not 16-byte aligned"},
  };
  for (const auto& c : cases) {
    KvCacheLayer cache = layer(c.dtype);
    c.change(cache);
    EXPECT_THAT([&] { check_kv_cache_layer(cache, "who"); }, refused_with(c.expected));
  }
}

// Every entry point checks the layer before anything else (flush after its jobs): a layer of no kv heads divided by
// zero (SIGFPE) in the q-head checks, and append_to_tails ran its D = 64 kernel for any head_dim other than 128.
TEST(CheckKvCacheLayer, EveryEntryPointChecksTheLayerFirst) {
  KvCacheLayer no_kv_heads = layer("kvarn_k4v2_g128");
  no_kv_heads.num_kv_heads = 0;
  KvCacheLayer head_dim_96 = layer("fp16");
  head_dim_96.layout.head_dim = 96;
  PrefillAttentionArgs prefill_args;
  prefill_args.num_seqs = prefill_args.num_rows = prefill_args.max_chunk_len = 1;
  prefill_args.num_q_heads = 8;
  DecodeAttentionArgs decode_args;
  decode_args.num_seqs = 1;
  decode_args.num_q_heads = 8;
  const std::vector<int> seq_tiles = {1};
  for (const auto& [cache, expected] :
       {std::pair{no_kv_heads, "cache.num_kv_heads 0; expected > 0"},
        std::pair{head_dim_96, "cache.layout.head_dim 96; expected 64 or 128"}}) {
    const std::string what = expected;
    EXPECT_THAT([&] { plan_decode_attention(cache, seq_tiles, 8); },
                refused_with("plan_decode_attention: " + what));
    EXPECT_THAT([&] { decode_attention(cache, decode_args, DecodeAttentionPlan{}, nullptr, nullptr); },
                refused_with("decode_attention: " + what));
    EXPECT_THAT([&] { prefill_attention(cache, prefill_args, nullptr, nullptr); },
                refused_with("prefill_attention: " + what));
    EXPECT_THAT([&] { prefill_attention_workspace_bytes(cache, 1, 1); },
                refused_with("prefill_attention_workspace_bytes: " + what));
    EXPECT_THAT([&] { append_to_tails(cache, nullptr, nullptr, nullptr, 1, nullptr); },
                refused_with("append_to_tails: " + what));
    EXPECT_THAT([&] { dequantize_prefix_tiles(cache, nullptr, 1, nullptr, 1, nullptr, nullptr); },
                refused_with("dequantize_prefix_tiles: " + what));
    EXPECT_THAT([&] { dequantized_prefix_bytes(cache, 1); }, refused_with("dequantized_prefix_bytes: " + what));
    EXPECT_THAT([&] { flush_full_tiles(cache, fake_device_address<TileFlushJob>(), 1, nullptr); },
                refused_with("flush_full_tiles: " + what));
  }
}

TEST(CheckDeviceMemory, RefusesANullOrMisalignedArray) {
  EXPECT_THAT([] { check_device_memory(nullptr, 16, "who", "q", "[rows] fp16"); },
              refused_with("who: q is null; expected device memory of [rows] fp16"));
  EXPECT_THAT([] { check_device_memory(fake_device_address<uint16_t>(4), 16, "who", "q", "[rows] fp16"); },
              refused_with("who: q at 0x10004 is not 16-byte aligned; expected device memory of [rows] fp16"));
  EXPECT_NO_THROW(check_device_memory(fake_device_address<int32_t>(4), 4, "who", "rows", "[rows] int32"));
}

// append_to_tails' other tests are flush_full_tiles_test.cpp's, which runs them beside the flush.
TEST(AppendToTails, RefusesNullOrMisalignedArrays) {
  KvCacheLayer cache = layer("kvarn_k4v2_g128");
  cache.tails = fake_device_address<uint16_t>();
  const uint16_t* aligned = fake_device_address<uint16_t>();
  const uint16_t* misaligned = fake_device_address<uint16_t>(2);
  const TailAppendRow* rows = fake_device_address<TailAppendRow>();
  const std::string rows_of_fp16 = "expected device memory of [num_rows][num_kv_heads][D] fp16";
  EXPECT_THAT([&] { append_to_tails(cache, nullptr, aligned, rows, 3, nullptr); },
              refused_with("append_to_tails: k is null; " + rows_of_fp16));
  EXPECT_THAT([&] { append_to_tails(cache, aligned, misaligned, rows, 3, nullptr); },
              refused_with("append_to_tails: v at 0x10002 is not 16-byte aligned; " + rows_of_fp16));
  EXPECT_THAT([&] { append_to_tails(cache, aligned, aligned, nullptr, 3, nullptr); },
              refused_with("append_to_tails: rows is null"));
  cache.tails = nullptr;  // a layer made for planning, without memory
  EXPECT_THAT([&] { append_to_tails(cache, aligned, aligned, rows, 3, nullptr); },
              refused_with("append_to_tails: cache.tails is null"));
}

}  // namespace
}  // namespace kvarn::cuda
