// dequantize_prefix_tiles against the CPU codec: every element of every decoded prefix tile is the fp16 rounding
// of codec::TileCodec::decode's fp32 value, bit for bit (both compute s (a code + z) in fp32 with one fma), for
// every code-tile kernel instance (the 4 presets at head_dim 64 and 128) and the rtn and rot ablations, 2, 3 and 8
// kv heads, over a batch whose sequences hold 0 to 5 tiles (empty ones first, between and last, which the slot
// search must skip) in shuffled blocks. The output is poisoned (NaN) before the run, so a slot or a kv head left
// unwritten fails too. The call is given two slots more than the sequences' tiles: those must stay poisoned (their
// owner, the last sequence, has no tile there to read).
#include "backend/cuda/dequantize_prefix.h"
#include "cuda_test_support.h"
#include "test_kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

namespace kvarn::cuda {
namespace {

using test::DeviceBuffer;

struct DequantizeCase {
  std::string dtype;
  int head_dim, kv_heads;
};

class DequantizePrefixTest : public ::testing::TestWithParam<DequantizeCase> {};

TEST_P(DequantizePrefixTest, EqualsTheCpuCodecBitForBit) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  const uint32_t seed = test::test_seed();
  const std::vector<test::SeqSpec> specs = {{0, 3}, {2, 0}, {0, 0}, {5, 17}, {1, 1}, {0, 9}};
  std::mt19937 rng(seed);
  const test::TestCache cache = test::build_test_cache(
      c.dtype, c.head_dim, c.kv_heads, specs, test::synthetic_kv_source(c.kv_heads, c.head_dim, {.seed = seed}), rng);
  const int d = c.head_dim, g = cache.tile_tokens, num_seqs = static_cast<int>(specs.size());

  std::vector<PrefillSequence> seqs;
  int slots = 0;
  for (int s = 0; s < num_seqs; ++s) {
    seqs.push_back({cache.views[s], 0, 0, slots});
    slots += specs[s].tiles;
  }
  DeviceBuffer<uint8_t> dblocks(cache.blocks);
  DeviceBuffer<int32_t> dtables(cache.tables);
  DeviceBuffer<PrefillSequence> dseqs(seqs);
  const KvCacheLayer layer = make_kv_cache_layer(cache.dtype, d, g, c.kv_heads, dblocks.get(), nullptr);
  ASSERT_EQ(dequantized_prefix_bytes(layer, slots), size_t{4} * slots * c.kv_heads * g * d);
  constexpr int kSlotsPastTheTiles = 2;
  DeviceBuffer<uint16_t> out(dequantized_prefix_bytes(layer, slots + kSlotsPastTheTiles) / 2);
  out.poison();
  dequantize_prefix_tiles(layer, dseqs.get(), num_seqs, dtables.get(), slots + kSlotsPastTheTiles,
                          reinterpret_cast<uint8_t*>(out.get()), nullptr);
  KVARN_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint16_t> got = out.download();

  // Slot j, kv head h: K [G][D] then V [G][D]; stored_k/v[s][h] hold the decoded tiles' tokens first.
  long mismatches = 0;
  for (int s = 0; s < num_seqs; ++s)
    for (int i = 0; i < specs[s].tiles; ++i)
      for (int h = 0; h < c.kv_heads; ++h)
        for (int which = 0; which < 2; ++which) {
          const auto& expected = (which == 0 ? cache.stored_k : cache.stored_v)[s][h];
          const uint16_t* tile = got.data() + ((static_cast<size_t>(seqs[s].prefix_tile_begin + i) * c.kv_heads + h) *
                                                   2 + which) * g * d;
          for (int t = 0; t < g; ++t)
            for (int ch = 0; ch < d; ++ch) {
              const uint16_t want = float_to_half(static_cast<float>(expected[(static_cast<size_t>(i) * g + t) * d + ch]));
              if (tile[t * d + ch] != want && ++mismatches <= 5)
                ADD_FAILURE() << c.dtype << " seq " << s << " tile " << i << " kv head " << h << (which ? " V" : " K")
                              << "[" << t << "][" << ch << "]: got fp16 0x" << std::hex << tile[t * d + ch]
                              << ", expected 0x" << want << std::dec << " (seed " << seed << ")";
            }
        }
  EXPECT_EQ(mismatches, 0) << "elements that differ from the CPU codec (seed " << seed << ")";
  const size_t tiles_end = dequantized_prefix_bytes(layer, slots) / 2;
  EXPECT_EQ(std::count(got.begin() + tiles_end, got.end(), uint16_t{0xffff}), static_cast<long>(got.size() - tiles_end))
      << "elements written in the slots past the sequences' tiles (seed " << seed << ")";
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, DequantizePrefixTest,
    ::testing::Values(DequantizeCase{"kvarn_k4v2_g128", 128, 2}, DequantizeCase{"kvarn_k4v4_g128", 128, 3},
                      DequantizeCase{"kvarn_k4v2_g64", 128, 2}, DequantizeCase{"kvarn_k4v4_g64", 128, 3},
                      DequantizeCase{"kvarn_k4v2_g128", 64, 2}, DequantizeCase{"kvarn_k4v4_g128", 64, 3},
                      DequantizeCase{"kvarn_k4v2_g64", 64, 8}, DequantizeCase{"kvarn_k4v4_g64", 64, 3},
                      DequantizeCase{"rtn_k4v2_g128", 128, 2}, DequantizeCase{"rot_k4v2_g128", 64, 2}),
    [](const auto& info) {
      return info.param.dtype + "_d" + std::to_string(info.param.head_dim) + "_kv" +
             std::to_string(info.param.kv_heads);
    });

TEST(DequantizePrefix, RefusesAnFp16Cache) {
  const KvCacheLayer layer = make_kv_cache_layer(codec::parse_cache_dtype("fp16"), 128, 128, 2, nullptr, nullptr);
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, nullptr, 1, nullptr, 1, nullptr, nullptr); },
              test::refused_with("fp16 tiles, not code tiles"));
}

// Counts are refused before they size anything: a negative one, or more tiles than the grid's CTAs (a tile per kv
// head each) hold. Without a GPU: nothing is launched.
TEST(DequantizePrefix, RefusesNegativeCountsAndMoreTilesThanTheGridHolds) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 8, nullptr, nullptr);
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, nullptr, -1, nullptr, 1, nullptr, nullptr); },
              test::refused_with("dequantize_prefix_tiles: num_seqs -1, num_prefix_tiles 1; expected counts >= 0"));
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, nullptr, 1, nullptr, -1, nullptr, nullptr); },
              test::refused_with("dequantize_prefix_tiles: num_seqs 1, num_prefix_tiles -1; expected counts >= 0"));
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, nullptr, 1, nullptr, 1 << 28, nullptr, nullptr); },
              test::refused_with("dequantize_prefix_tiles: num_prefix_tiles 268435456 x 8 kv heads = 2147483648 CTAs "
                                 "exceed the grid limit (2^31 - 1)"));
  EXPECT_THAT([&] { dequantized_prefix_bytes(layer, -1); },
              test::refused_with("dequantized_prefix_bytes: num_prefix_tiles -1; expected >= 0"));
}

// The arrays it reads and writes: null ones fault on the device, and its 16-byte copies and stores need `out` and
// the blocks aligned. The addresses are never read.
TEST(DequantizePrefix, RefusesNullOrMisalignedArrays) {
  const auto address = [](uintptr_t offset) { return test::fake_device_address<uint8_t>(offset); };
  const auto* seqs = reinterpret_cast<const PrefillSequence*>(address(0));
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, address(0), nullptr);
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, nullptr, 1, nullptr, 3, address(0), nullptr); },
              test::refused_with("dequantize_prefix_tiles: seqs is null; expected device memory of [num_seqs]"));
  EXPECT_THAT([&] { dequantize_prefix_tiles(layer, seqs, 1, nullptr, 3, address(8), nullptr); },
              test::refused_with("dequantize_prefix_tiles: out at 0x10008 is not 16-byte aligned; expected device "
                                 "memory of dequantized_prefix_bytes(3 tiles) bytes"));
  const KvCacheLayer without_blocks =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  EXPECT_THAT([&] { dequantize_prefix_tiles(without_blocks, seqs, 1, nullptr, 3, address(0), nullptr); },
              test::refused_with("dequantize_prefix_tiles: cache.blocks is null"));
}

}  // namespace
}  // namespace kvarn::cuda
