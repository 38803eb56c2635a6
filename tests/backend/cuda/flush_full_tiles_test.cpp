// append_to_tails and flush_full_tiles against the CPU codec. Append must be bit-exact (same butterflies, same
// rounding). Flush: the tile bytes must equal TileCodec::encode_stored of the same fp16 tail, bit for bit (the
// kernel runs the codec's operations in the codec's order: codec/variance_normalize.cpp). Where they would not,
// the test says which codes and fp16 scales differ, and whether the decoded tiles still agree within
// kMaxDecodedError of the tile's largest value wherever the codes agree (a different kept iterate of equal
// imbalance has scales that differ by a factor that cancels): the spec's "Conformance" tolerance, which the
// kernel no longer needs.
// Inputs: fresh random normal K/V, synthetic K/V with a 100x sink token and 30x channels, an all-zero tile,
// constant tiles, and real K/V captured from kvarn-test-lm. The tails are poisoned before the append, which writes
// the rows in a shuffled order over two launches, and a slot no row names must stay poisoned; blocks are poisoned
// before each flush and the blocks no job names must stay poisoned.
#include "backend/cuda/append_to_tails.h"
#include "backend/cuda/flush_full_tiles.h"
#include "backend/cuda/kv_layout.h"
#include "codec/hadamard.h"
#include "codec/rtn.h"
#include "codec/synthetic_kv.h"
#include "codec/tile_codec.h"
#include "cuda_test_support.h"
#include "shared_dir.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>

namespace kvarn::cuda {
namespace {

using test::DeviceBuffer;

constexpr float kMaxDecodedError = 4e-3;  // of the tile's largest |value|: three fp16 factors, 2^-11 each

// One KV cache layer on the device with `slots` tail slots and `blocks` blocks.
struct DeviceLayer {
  DeviceBuffer<uint8_t> blocks;
  DeviceBuffer<uint16_t> tails;
  KvCacheLayer view;
  DeviceLayer(const codec::CacheDtype& dtype, int d, int g, int heads, int num_blocks, int slots)
      : blocks(make_kv_cache_layer(dtype, d, g, heads, nullptr, nullptr).block_bytes() * num_blocks),
        tails(make_kv_cache_layer(dtype, d, g, heads, nullptr, nullptr).tail_slot_elements() * slots),
        view(make_kv_cache_layer(dtype, d, g, heads, blocks.get(), tails.get())) {}
};

// Appends token rows [rows][heads][D] (model space) to (slot, position) targets.
void append(DeviceLayer& layer, const std::vector<float>& k, const std::vector<float>& v,
            const std::vector<TailAppendRow>& targets) {
  DeviceBuffer<uint16_t> dk(test::to_half(k)), dv(test::to_half(v));
  DeviceBuffer<TailAppendRow> dt(targets);
  append_to_tails(layer.view, dk.get(), dv.get(), dt.get(), static_cast<int>(targets.size()), nullptr);
  KVARN_CUDA_CHECK(cudaDeviceSynchronize());
}

uint16_t load_u16(const uint8_t* p) {
  uint16_t x;
  std::memcpy(&x, p, 2);
  return x;
}

struct TileDiff {
  long codes = 0, code_mismatches = 0, scales = 0, scale_mismatches = 0, values = 0, value_mismatches = 0;
};

// Compares a device tile with the CPU codec's, per the budget above.
void compare_tiles(const codec::TileCodec& codec, const uint8_t* gpu, const uint8_t* cpu, TileDiff& diff) {
  const codec::TileLayout& l = codec.layout();
  if (!l.code_tile) {
    for (size_t i = 0; i < l.bytes; ++i) diff.code_mismatches += gpu[i] != cpu[i];
    diff.codes += static_cast<long>(l.bytes);
    return;
  }
  const int d = l.head_dim, g = l.tokens;
  // codes_differ[K|V][token][channel]
  std::vector<std::vector<bool>> codes_differ(2, std::vector<bool>(static_cast<size_t>(g) * d, false));
  auto compare_codes = [&](size_t offset, int rows, int cols, int bits, bool keys) {
    std::vector<uint8_t> a(cols), b(cols);
    const size_t row_bytes = static_cast<size_t>(cols) * bits / 8;
    for (int r = 0; r < rows; ++r) {
      codec::unpack_codes(gpu + offset + r * row_bytes, cols, bits, a.data());
      codec::unpack_codes(cpu + offset + r * row_bytes, cols, bits, b.data());
      for (int c = 0; c < cols; ++c) {
        ++diff.codes;
        if (a[c] == b[c]) continue;
        ++diff.code_mismatches;
        EXPECT_LE(std::abs(a[c] - b[c]), 1) << "row " << r << " col " << c;
        codes_differ[keys ? 0 : 1][keys ? static_cast<size_t>(c) * d + r : static_cast<size_t>(r) * d + c] = true;
      }
    }
  };
  auto count_scales = [&](size_t offset, int n) {
    for (int i = 0; i < n; ++i) {
      ++diff.scales;
      diff.scale_mismatches += load_u16(gpu + offset + 2 * i) != load_u16(cpu + offset + 2 * i);
    }
  };
  compare_codes(l.key_codes, d, g, l.key_bits, true);
  compare_codes(l.value_codes, g, d, l.value_bits, false);
  for (auto [offset, n] : {std::pair{l.key_scale, d}, {l.key_zero, d}, {l.key_token_scale, g},
                           {l.value_channel_scale, d}, {l.value_scale, g}, {l.value_zero, g}})
    count_scales(offset, n);
  // The decoded tiles must agree wherever the codes do: the fp16 factors may differ by a power-of-two-free gauge
  // (s_col * c, s_row / c) when the normalization kept a different but equally balanced iterate.
  std::vector<float> gk(static_cast<size_t>(g) * d), gv(gk.size()), ck(gk.size()), cv(gk.size());
  codec.decode(gpu, gk.data(), gv.data());
  codec.decode(cpu, ck.data(), cv.data());
  for (int which = 0; which < 2; ++which) {
    const auto& got = which == 0 ? gk : gv;
    const auto& want = which == 0 ? ck : cv;
    float max_abs = 0;
    for (float x : want) max_abs = std::max(max_abs, std::fabs(x));
    for (size_t i = 0; i < got.size(); ++i) {
      if (codes_differ[which][i]) continue;
      ++diff.values;
      if (std::fabs(got[i] - want[i]) > kMaxDecodedError * max_abs) ++diff.value_mismatches;
    }
  }
}

// Fills `jobs` full tails (slot j) with the given per-job K/V [G][heads][D], appended row by row in an order shuffled
// by `seed` over two launches; flushes them into blocks block_of[j] and checks every tile, that the tail slot after
// the jobs' stays poisoned and so do the blocks no job names.
void flush_and_check(const std::string& dtype_name, int d, int heads, const std::vector<std::vector<float>>& keys,
                     const std::vector<std::vector<float>>& values, const std::vector<int>& block_of, int num_blocks,
                     uint32_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  const codec::CacheDtype dtype = codec::parse_cache_dtype(dtype_name);
  const int g = dtype.tile_tokens ? dtype.tile_tokens : 128;
  const int jobs = static_cast<int>(keys.size());
  DeviceLayer layer(dtype, d, g, heads, num_blocks, jobs + 1);
  layer.tails.poison();
  std::vector<std::pair<int, int>> order;  // (job, token)
  for (int j = 0; j < jobs; ++j)
    for (int t = 0; t < g; ++t) order.push_back({j, t});
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  const size_t token_floats = static_cast<size_t>(heads) * d, first_launch = order.size() / 3;
  for (const auto& [begin, end] : {std::pair{size_t{0}, first_launch}, std::pair{first_launch, order.size()}}) {
    std::vector<float> k, v;
    std::vector<TailAppendRow> targets;
    for (size_t i = begin; i < end; ++i) {
      const auto [j, t] = order[i];
      k.insert(k.end(), keys[j].begin() + t * token_floats, keys[j].begin() + (t + 1) * token_floats);
      v.insert(v.end(), values[j].begin() + t * token_floats, values[j].begin() + (t + 1) * token_floats);
      targets.push_back({j, t});
    }
    append(layer, k, v, targets);
  }

  // The tail must be the CPU's rotation, rounded to fp16, bit for bit.
  const auto tails = layer.tails.download();
  for (int j = 0; j < jobs; ++j)
    for (int t = 0; t < g; ++t)
      for (int h = 0; h < heads; ++h)
        for (int which = 0; which < 2; ++which) {
          const auto& src = which == 0 ? keys[j] : values[j];
          std::vector<float> row(src.begin() + (static_cast<size_t>(t) * heads + h) * d,
                                 src.begin() + (static_cast<size_t>(t) * heads + h + 1) * d);
          for (auto& x : row) x = round_to_half(x);
          if (dtype.rotated()) codec::hadamard_rotate(row.data(), d);
          const uint16_t* got = tails.data() + (((static_cast<size_t>(j) * 2 + which) * heads + h) * g + t) * d;
          for (int c = 0; c < d; ++c)
            ASSERT_EQ(got[c], float_to_half(row[c])) << "tail slot " << j << " token " << t << " channel " << c;
        }
  const size_t slot_elements = layer.view.tail_slot_elements();
  for (size_t i = 0; i < slot_elements; ++i)
    ASSERT_EQ(tails[jobs * slot_elements + i], 0xffff) << "the tail slot no row names was written at " << i;

  layer.blocks.poison();
  std::vector<TileFlushJob> flush_jobs;
  for (int j = 0; j < jobs; ++j) flush_jobs.push_back({j, block_of[j]});
  DeviceBuffer<TileFlushJob> djobs(flush_jobs);
  flush_full_tiles(layer.view, djobs.get(), jobs, nullptr);
  KVARN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto blocks = layer.blocks.download();

  const codec::TileCodec codec(dtype, d, g);
  const codec::TileLayout& l = codec.layout();
  TileDiff diff;
  std::vector<uint8_t> expected(l.bytes);
  std::vector<float> tk(static_cast<size_t>(g) * d), tv(tk.size());
  for (int j = 0; j < jobs; ++j)
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < g * d; ++i) {
        tk[i] = half_to_float(tails[((static_cast<size_t>(j) * 2 + 0) * heads + h) * g * d + i]);
        tv[i] = half_to_float(tails[((static_cast<size_t>(j) * 2 + 1) * heads + h) * g * d + i]);
      }
      codec.encode_stored(tk.data(), tv.data(), expected.data());
      compare_tiles(codec, blocks.data() + (static_cast<size_t>(block_of[j]) * heads + h) * l.bytes,
                    expected.data(), diff);
    }
  if (l.code_tile) {
    EXPECT_EQ(diff.code_mismatches, 0) << "of " << diff.codes << " codes";
    EXPECT_EQ(diff.scale_mismatches, 0) << "of " << diff.scales << " fp16 scales";
    EXPECT_EQ(diff.value_mismatches, 0) << "of " << diff.values << " decoded values";
  } else {
    EXPECT_EQ(diff.code_mismatches, 0);
  }
  std::vector<bool> used(num_blocks, false);
  for (int b : block_of) used[b] = true;
  for (int b = 0; b < num_blocks; ++b) {
    if (used[b]) continue;
    for (size_t i = 0; i < l.bytes * heads; ++i)
      ASSERT_EQ(blocks[b * l.bytes * heads + i], 0xff) << "block " << b << " was written";
  }
  std::printf("  %s D=%d: %ld/%ld codes, %ld/%ld fp16 scales, %ld/%ld decoded values differ from the CPU codec\n",
              dtype_name.c_str(), d, diff.code_mismatches, diff.codes, diff.scale_mismatches, diff.scales,
              diff.value_mismatches, diff.values);
}

struct FlushCase {
  std::string dtype;
  int head_dim;
};

class FlushTest : public ::testing::TestWithParam<FlushCase> {};

TEST_P(FlushTest, MatchesCpuCodecOnRandomAndEdgeTiles) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto [name, d] = GetParam();
  const codec::CacheDtype dtype = codec::parse_cache_dtype(name);
  const int g = dtype.tile_tokens ? dtype.tile_tokens : 128, heads = 2;
  const size_t n = static_cast<size_t>(g) * heads * d;
  const uint32_t seed = test::test_seed();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> keys, values;
  // 0-1: random normal with a per-channel spread.
  for (int j = 0; j < 2; ++j) {
    std::vector<float> k(n), v(n);
    for (size_t i = 0; i < n; ++i) k[i] = normal(rng) * (1.0f + (i % d) % 7), v[i] = normal(rng);
    keys.push_back(k), values.push_back(v);
  }
  // 2: synthetic, with a 50-100x sink token and 10-30x outlier channels, per head.
  {
    std::vector<float> k(n), v(n);
    for (int h = 0; h < heads; ++h) {
      const auto s = codec::synthetic_kv({.tokens = g, .head_dim = d, .seed = rng()});
      for (int t = 0; t < g; ++t)
        for (int c = 0; c < d; ++c) {
          k[(static_cast<size_t>(t) * heads + h) * d + c] = s.keys[t * d + c];
          v[(static_cast<size_t>(t) * heads + h) * d + c] = s.values[t * d + c];
        }
    }
    keys.push_back(k), values.push_back(v);
  }
  // 3: all zero; 4: every element the same constant; 5: constant per token (constant value rows).
  keys.push_back(std::vector<float>(n, 0.0f)), values.push_back(std::vector<float>(n, 0.0f));
  keys.push_back(std::vector<float>(n, 1.5f)), values.push_back(std::vector<float>(n, -0.75f));
  {
    std::vector<float> k(n), v(n);
    for (size_t i = 0; i < n; ++i) k[i] = normal(rng), v[i] = static_cast<float>(i / (heads * d)) * 0.01f;
    keys.push_back(k), values.push_back(v);
  }
  flush_and_check(name, d, heads, keys, values, {7, 2, 0, 5, 3, 6}, 9, seed);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FlushTest,
                         ::testing::Values(FlushCase{"kvarn_k4v2_g128", 128}, FlushCase{"kvarn_k4v4_g128", 128},
                                           FlushCase{"kvarn_k4v2_g64", 128}, FlushCase{"kvarn_k4v4_g64", 128},
                                           FlushCase{"kvarn_k4v2_g128", 64}, FlushCase{"kvarn_k4v4_g64", 64},
                                           FlushCase{"rot_k4v2_g128", 128}, FlushCase{"rtn_k4v2_g128", 128},
                                           FlushCase{"fp16", 128}, FlushCase{"fp16", 64}),
                         [](const auto& info) { return info.param.dtype + "_d" + std::to_string(info.param.head_dim); });

TEST(FlushCapturedKv, MatchesCpuCodecOnRealKeysAndValues) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto captured =
      test::load_captured_kv((kvarn::test::shared_dir() / "golden/kvarn-test-lm/kv_capture.safetensors").string());
  if (captured.empty()) GTEST_SKIP() << "kv_capture.safetensors not found under " << kvarn::test::shared_dir();
  const uint32_t seed = test::test_seed();
  for (const std::string layer : {"layer0", "layer4", "layer7"}) {
    const auto& ck = captured.at(layer + ".k");
    const auto& cv = captured.at(layer + ".v");
    const int heads = ck.shape[0], tokens = ck.shape[1], d = ck.shape[2], g = 128, tiles = tokens / g;
    std::vector<std::vector<float>> keys(tiles), values(tiles);
    std::vector<int> block_of;
    for (int j = 0; j < tiles; ++j) {
      keys[j].resize(static_cast<size_t>(g) * heads * d), values[j].resize(keys[j].size());
      for (int t = 0; t < g; ++t)
        for (int h = 0; h < heads; ++h)
          for (int c = 0; c < d; ++c) {
            const size_t src = (static_cast<size_t>(h) * tokens + j * g + t) * d + c;
            keys[j][(static_cast<size_t>(t) * heads + h) * d + c] = half_to_float(ck.data[src]);
            values[j][(static_cast<size_t>(t) * heads + h) * d + c] = half_to_float(cv.data[src]);
          }
      block_of.push_back(tiles - 1 - j);
    }
    for (const char* dtype : {"kvarn_k4v2_g128", "kvarn_k4v4_g128"})
      flush_and_check(dtype, d, heads, keys, values, block_of, tiles + 1, seed);
  }
}

}  // namespace
}  // namespace kvarn::cuda
