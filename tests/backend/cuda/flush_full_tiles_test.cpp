// append_to_tails and flush_full_tiles against the CPU codec. Append must be bit-exact (same butterflies, same
// rounding). Flush: the tile bytes must equal TileCodec::encode_stored of the same fp16 tail, bit for bit (the
// kernel runs the codec's operations in the codec's order: codec/variance_normalize.cpp). Where they would not,
// the test says which codes and fp16 scales differ, and whether the decoded tiles still agree within
// kMaxDecodedError of the tile's largest value wherever the codes agree (a different kept iterate of equal
// imbalance has scales that differ by a factor that cancels): the spec's "Conformance" tolerance, which the
// kernel no longer needs.
// Inputs: fresh random normal K/V, synthetic K/V with a 100x sink token and 30x channels, an all-zero tile,
// constant tiles, loud (~5e4) and quiet (fp16 subnormal) tiles, a tile of one element, a tile half constant, and
// real K/V captured from kvarn-test-lm; every preset and ablation at head_dim 64 and 128, fp16 at 64- and 128-token
// blocks, 1, 3 and 8 kv heads. Tails and blocks are poisoned first; the rows are appended in a shuffled order over
// two launches (the first of an odd count) into shuffled slots, and the full tails flushed into shuffled blocks,
// on one stream with no synchronization of the host in between. After it the tails must hold the rotated rows
// (the flush leaves them as they were), the positions of a partial tail no row names, a slot no row names and the
// blocks no job names must stay poisoned. A cache's layers in one call (130 layers: two launches), each from its own
// tails.
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
#include <memory>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

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

// A stream of the test's own, so that append and flush run one after the other as a step queues them, with no
// synchronization of the host between them. Blocking: its kernels start after the uploads and the poisoning on the
// legacy stream (a copy from pageable memory may return before it lands).
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { KVARN_CUDA_CHECK(cudaStreamCreate(&s)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() { cudaStreamDestroy(s); }
};

// Token rows [rows][heads][D] (model space) and their (slot, position) targets, on the device: one append launch.
struct AppendLaunch {
  DeviceBuffer<uint16_t> k, v;
  DeviceBuffer<TailAppendRow> targets;
  AppendLaunch(const std::vector<float>& k_, const std::vector<float>& v_, const std::vector<TailAppendRow>& t)
      : k(test::to_half(k_)), v(test::to_half(v_)), targets(t) {}
  void run(DeviceLayer& layer, cudaStream_t stream) const {
    append_to_tails(layer.view, k.get(), v.get(), targets.get(), static_cast<int>(targets.size()), stream);
  }
};

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

// Fills `jobs` full tails with the given per-job K/V [G][heads][D], job j in slot slot_of[j] (a shuffle by `seed`
// of jobs + 2 slots), and a partial tail of rows of its own in another slot at positions 0, G/2 and G - 1; the rows
// are appended in an order shuffled by `seed` over two launches, then the full tails are flushed into
// blocks block_of[j], all on one stream with no synchronization of the host between the kernels. Checks the tails
// bit for bit after the flush (the flush leaves them as they were), that the partial tail's other positions and
// the slot no row names stay poisoned, every tile, and that the blocks no job names stay poisoned.
void flush_and_check(const std::string& dtype_name, int d, int g, int heads,
                     const std::vector<std::vector<float>>& keys, const std::vector<std::vector<float>>& values,
                     const std::vector<int>& block_of, int num_blocks, uint32_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  const codec::CacheDtype dtype = codec::parse_cache_dtype(dtype_name);
  const int jobs = static_cast<int>(keys.size()), slots = jobs + 2;
  std::mt19937 rng(seed);
  std::vector<int> slot_of(slots);
  std::iota(slot_of.begin(), slot_of.end(), 0);
  std::shuffle(slot_of.begin(), slot_of.end(), rng);
  const int partial_slot = slot_of[jobs], empty_slot = slot_of[jobs + 1];
  const std::vector<int> partial_positions = {0, g / 2, g - 1};
  DeviceLayer layer(dtype, d, g, heads, num_blocks, slots);
  layer.tails.poison();
  layer.blocks.poison();

  struct Row {
    int job, token;  // job == jobs: the partial tail, token one of partial_positions
  };
  std::vector<Row> order;
  for (int j = 0; j < jobs; ++j)
    for (int t = 0; t < g; ++t) order.push_back({j, t});
  for (int t : partial_positions) order.push_back({jobs, t});
  std::shuffle(order.begin(), order.end(), rng);
  const size_t token_floats = static_cast<size_t>(heads) * d;
  std::normal_distribution<float> normal;
  std::vector<float> partial_k(g * token_floats), partial_v(partial_k.size());
  for (size_t i = 0; i < partial_k.size(); ++i) partial_k[i] = normal(rng), partial_v[i] = normal(rng);
  auto source = [&](const Row& r, bool value) -> const std::vector<float>& {
    if (r.job == jobs) return value ? partial_v : partial_k;
    return (value ? values : keys)[r.job];
  };
  // An odd count of rows in the first launch: its last CTA then has warps past the rows (the guard of a row past
  // num_rows runs) wherever the kv heads are not a multiple of 4 (a row takes 2 warps per kv head, a CTA 8).
  const size_t first_launch = (order.size() / 3) | 1;
  auto launch_of = [&](size_t begin, size_t end) {
    std::vector<float> k, v;
    std::vector<TailAppendRow> targets;
    for (size_t i = begin; i < end; ++i) {
      const Row& r = order[i];
      for (int value = 0; value < 2; ++value) {
        const std::vector<float>& src = source(r, value);
        (value ? v : k).insert((value ? v : k).end(), src.begin() + r.token * token_floats,
                               src.begin() + (r.token + 1) * token_floats);
      }
      targets.push_back({r.job == jobs ? partial_slot : slot_of[r.job], r.token});
    }
    return AppendLaunch(k, v, targets);
  };
  const AppendLaunch first = launch_of(0, first_launch), second = launch_of(first_launch, order.size());
  std::vector<TileFlushJob> flush_jobs;
  for (int j = 0; j < jobs; ++j) flush_jobs.push_back({slot_of[j], block_of[j]});
  DeviceBuffer<TileFlushJob> djobs(flush_jobs);
  {
    Stream stream;
    first.run(layer, stream.s);
    second.run(layer, stream.s);
    flush_full_tiles(layer.view, djobs.get(), jobs, stream.s);
    KVARN_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  }
  const auto tails = layer.tails.download();
  const auto blocks = layer.blocks.download();

  // The tails must be the CPU's rotation, rounded to fp16, bit for bit.
  auto tail_at = [&](int slot, int which, int h, int t) {
    return tails.data() + (((static_cast<size_t>(slot) * 2 + which) * heads + h) * g + t) * d;
  };
  for (const Row& r : order)
    for (int h = 0; h < heads; ++h)
      for (int which = 0; which < 2; ++which) {
        const std::vector<float>& src = source(r, which == 1);
        std::vector<float> row(src.begin() + (static_cast<size_t>(r.token) * heads + h) * d,
                               src.begin() + (static_cast<size_t>(r.token) * heads + h + 1) * d);
        for (auto& x : row) x = round_to_half(x);
        if (dtype.rotated()) codec::hadamard_rotate(row.data(), d);
        const int slot = r.job == jobs ? partial_slot : slot_of[r.job];
        const uint16_t* got = tail_at(slot, which, h, r.token);
        for (int c = 0; c < d; ++c)
          ASSERT_EQ(got[c], float_to_half(row[c])) << "tail slot " << slot << " token " << r.token << " channel " << c;
      }
  for (int t = 0; t < g; ++t) {
    const bool written = std::find(partial_positions.begin(), partial_positions.end(), t) != partial_positions.end();
    for (int which = 0; which < 2; ++which)
      for (int h = 0; h < heads; ++h)
        for (int c = 0; c < d; ++c) {
          if (!written) {
            ASSERT_EQ(tail_at(partial_slot, which, h, t)[c], 0xffff) << "the partial tail was written at token " << t;
          }
          ASSERT_EQ(tail_at(empty_slot, which, h, t)[c], 0xffff) << "the tail slot no row names was written";
        }
  }

  const codec::TileCodec codec(dtype, d, g);
  const codec::TileLayout& l = codec.layout();
  TileDiff diff;
  std::vector<uint8_t> expected(l.bytes);
  std::vector<float> tk(static_cast<size_t>(g) * d), tv(tk.size());
  for (int j = 0; j < jobs; ++j)
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < g * d; ++i) {
        tk[i] = half_to_float(tail_at(slot_of[j], 0, h, 0)[i]);
        tv[i] = half_to_float(tail_at(slot_of[j], 1, h, 0)[i]);
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
  std::printf("  %s D=%d G=%d, %d kv heads: %ld/%ld codes, %ld/%ld fp16 scales, %ld/%ld decoded values differ from "
              "the CPU codec\n",
              dtype_name.c_str(), d, g, heads, diff.code_mismatches, diff.codes, diff.scale_mismatches, diff.scales,
              diff.value_mismatches, diff.values);
}

struct FlushCase {
  std::string dtype;
  int head_dim;
  int heads = 3;       // kv heads: not 2, so that a head index mixed up with K|V (also 2) shows
  int block_size = 0;  // tokens per tile; 0: the dtype's own, 128 for fp16
};

class FlushTest : public ::testing::TestWithParam<FlushCase> {};

// `jobs` distinct blocks of jobs + 3, in an order shuffled by rng: three blocks no job names.
std::vector<int> shuffled_blocks(int jobs, std::mt19937& rng) {
  std::vector<int> blocks(jobs + 3);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  blocks.resize(jobs);
  return blocks;
}

TEST_P(FlushTest, MatchesCpuCodecOnRandomAndEdgeTiles) {
  KVARN_SKIP_WITHOUT_GPU();
  const FlushCase c = GetParam();
  const codec::CacheDtype dtype = codec::parse_cache_dtype(c.dtype);
  const int d = c.head_dim, heads = c.heads;
  const int g = c.block_size ? c.block_size : dtype.tile_tokens ? dtype.tile_tokens : 128;
  const size_t n = static_cast<size_t>(g) * heads * d;
  const uint32_t seed = test::test_seed();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> keys, values;
  auto random_tile = [&](float scale) {
    std::vector<float> k(n), v(n);
    for (size_t i = 0; i < n; ++i) k[i] = scale * normal(rng) * (1.0f + (i % d) % 7), v[i] = scale * normal(rng);
    keys.push_back(k), values.push_back(v);
  };
  // 0-1: random normal with a per-channel spread.
  random_tile(1.0f), random_tile(1.0f);
  // 2: synthetic, with a 50-100x sink token and 10-30x outlier channels, per head.
  {
    std::vector<float> k(n), v(n);
    for (int h = 0; h < heads; ++h) {
      const auto s = codec::synthetic_kv({.tokens = g, .head_dim = d, .seed = rng()});
      for (int t = 0; t < g; ++t)
        for (int ch = 0; ch < d; ++ch) {
          k[(static_cast<size_t>(t) * heads + h) * d + ch] = s.keys[t * d + ch];
          v[(static_cast<size_t>(t) * heads + h) * d + ch] = s.values[t * d + ch];
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
  // 6: loud, up to ~5e4 (the fp16 scales' power-of-two balance moves the row factors down: codec
  // balance_for_fp16); 7: quiet, fp16 subnormals (it moves them up).
  random_tile(1e4f / 8), random_tile(1e-5f);
  // 8: one element, the rest zero; 9: the second half of the tokens one constant.
  {
    std::vector<float> k(n, 0.0f), v(n, 0.0f);
    const size_t at = (static_cast<size_t>(g / 3) * heads + heads - 1) * d + 5;
    k[at] = 40.0f, v[at] = -3.0f;
    keys.push_back(k), values.push_back(v);
  }
  {
    std::vector<float> k(n), v(n);
    for (size_t i = 0; i < n; ++i) {
      const bool second_half = i / (heads * d) >= static_cast<size_t>(g / 2);
      k[i] = second_half ? 0.25f : normal(rng), v[i] = second_half ? -0.5f : normal(rng);
    }
    keys.push_back(k), values.push_back(v);
  }
  const int jobs = static_cast<int>(keys.size());
  flush_and_check(c.dtype, d, g, heads, keys, values, shuffled_blocks(jobs, rng), jobs + 3, seed);
}

// Every preset and ablation at both head sizes, fp16 at both tile lengths (its block size), 3 kv heads; 8 (a
// model's) and 1 for a preset each.
INSTANTIATE_TEST_SUITE_P(
    Dtypes, FlushTest,
    ::testing::Values(FlushCase{"kvarn_k4v2_g128", 128}, FlushCase{"kvarn_k4v4_g128", 128},
                      FlushCase{"kvarn_k4v2_g64", 128}, FlushCase{"kvarn_k4v4_g64", 128},
                      FlushCase{"rot_k4v2_g128", 128}, FlushCase{"rtn_k4v2_g128", 128},
                      FlushCase{"kvarn_k4v2_g128", 64}, FlushCase{"kvarn_k4v4_g128", 64},
                      FlushCase{"kvarn_k4v2_g64", 64}, FlushCase{"kvarn_k4v4_g64", 64}, FlushCase{"rot_k4v2_g128", 64},
                      FlushCase{"rtn_k4v2_g128", 64}, FlushCase{"kvarn_k4v2_g128", 128, 8},
                      FlushCase{"kvarn_k4v2_g64", 64, 1}, FlushCase{"fp16", 128}, FlushCase{"fp16", 64},
                      FlushCase{"fp16", 128, 3, 64}, FlushCase{"fp16", 64, 8, 64}),
    [](const auto& info) {
      const FlushCase& c = info.param;
      return c.dtype + "_d" + std::to_string(c.head_dim) + "_h" + std::to_string(c.heads) +
             (c.block_size ? "_b" + std::to_string(c.block_size) : "");
    });

// The captured K/V ([heads][tokens][D]) as tiles of g tokens, [tile][G][heads][D].
std::vector<std::vector<float>> captured_tiles(const test::CapturedTensor& x, int g) {
  const int heads = x.shape[0], tokens = x.shape[1], d = x.shape[2];
  std::vector<std::vector<float>> tiles(tokens / g, std::vector<float>(static_cast<size_t>(g) * heads * d));
  for (size_t j = 0; j < tiles.size(); ++j)
    for (int t = 0; t < g; ++t)
      for (int h = 0; h < heads; ++h)
        for (int c = 0; c < d; ++c)
          tiles[j][(static_cast<size_t>(t) * heads + h) * d + c] =
              half_to_float(x.data[(static_cast<size_t>(h) * tokens + j * g + t) * d + c]);
  return tiles;
}

TEST(FlushCapturedKv, MatchesCpuCodecOnRealKeysAndValues) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto captured =
      test::load_captured_kv((kvarn::test::shared_dir() / "golden/kvarn-test-lm/kv_capture.safetensors").string());
  if (captured.empty()) GTEST_SKIP() << "kv_capture.safetensors not found under " << kvarn::test::shared_dir();
  const uint32_t seed = test::test_seed();
  std::mt19937 rng(seed);
  for (const std::string layer : {"layer0", "layer4", "layer7"}) {
    const test::CapturedTensor& k = captured.at(layer + ".k");
    const test::CapturedTensor& v = captured.at(layer + ".v");
    for (const char* dtype : {"kvarn_k4v2_g128", "kvarn_k4v4_g128", "kvarn_k4v2_g64", "kvarn_k4v4_g64"}) {
      const int g = codec::parse_cache_dtype(dtype).tile_tokens;
      const auto keys = captured_tiles(k, g), values = captured_tiles(v, g);
      const int jobs = static_cast<int>(keys.size());
      flush_and_check(dtype, k.shape[2], g, k.shape[0], keys, values, shuffled_blocks(jobs, rng), jobs + 3, seed);
    }
  }
}

// A cache's layers in one call: a job's slot is flushed in every layer, each layer's tiles from its own tails (one
// launch per 128 layers: 130 take two). The tails are uploaded as stored, so each tile must equal
// TileCodec::encode_stored of its tail bit for bit; the block no job names stays poisoned in every layer.
struct LayersCase {
  std::string dtype;
  int head_dim, heads, layers;
};

class FlushLayersTest : public ::testing::TestWithParam<LayersCase> {};

TEST_P(FlushLayersTest, FlushesEveryLayerInOneCall) {
  KVARN_SKIP_WITHOUT_GPU();
  const LayersCase c = GetParam();
  const codec::CacheDtype dtype = codec::parse_cache_dtype(c.dtype);
  const int d = c.head_dim, heads = c.heads, g = dtype.tile_tokens ? dtype.tile_tokens : 128;
  const uint32_t seed = test::test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const std::vector<TileFlushJob> jobs = {{1, 2}, {0, 0}};  // block 1 is no job's
  const int num_blocks = 3, slots = 2;
  std::vector<std::unique_ptr<DeviceLayer>> layers;
  std::vector<KvCacheLayer> views;
  std::vector<std::vector<uint16_t>> tails;
  for (int i = 0; i < c.layers; ++i) {
    layers.push_back(std::make_unique<DeviceLayer>(dtype, d, g, heads, num_blocks, slots));
    std::vector<uint16_t> t(layers.back()->tails.size());
    for (auto& x : t) x = float_to_half(normal(rng));
    layers.back()->tails.upload(t);
    layers.back()->blocks.poison();
    views.push_back(layers.back()->view);
    tails.push_back(std::move(t));
  }
  const DeviceBuffer<TileFlushJob> djobs(jobs);
  flush_full_tiles(views, djobs.get(), static_cast<int>(jobs.size()), nullptr);
  KVARN_CUDA_CHECK(cudaDeviceSynchronize());

  const codec::TileCodec codec(dtype, d, g);
  const size_t tile_bytes = codec.layout().bytes, matrix = static_cast<size_t>(g) * d;
  std::vector<float> tk(matrix), tv(matrix);
  std::vector<uint8_t> expected(tile_bytes);
  for (int i = 0; i < c.layers; ++i) {
    SCOPED_TRACE("layer " + std::to_string(i));
    const auto blocks = layers[i]->blocks.download();
    TileDiff diff;
    for (const TileFlushJob& job : jobs)
      for (int h = 0; h < heads; ++h) {
        const uint16_t* k = tails[i].data() + ((static_cast<size_t>(job.tail_slot) * 2 + 0) * heads + h) * matrix;
        const uint16_t* v = tails[i].data() + ((static_cast<size_t>(job.tail_slot) * 2 + 1) * heads + h) * matrix;
        for (size_t e = 0; e < matrix; ++e) tk[e] = half_to_float(k[e]), tv[e] = half_to_float(v[e]);
        codec.encode_stored(tk.data(), tv.data(), expected.data());
        compare_tiles(codec, blocks.data() + (static_cast<size_t>(job.block) * heads + h) * tile_bytes,
                      expected.data(), diff);
      }
    ASSERT_EQ(diff.code_mismatches, 0) << "of " << diff.codes << (codec.layout().code_tile ? " codes" : " bytes");
    ASSERT_EQ(diff.scale_mismatches, 0) << "of " << diff.scales << " fp16 scales";
    for (size_t b = tile_bytes * heads; b < 2 * tile_bytes * heads; ++b)
      ASSERT_EQ(blocks[b], 0xff) << "block 1, which no job names, was written";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FlushLayersTest,
                         ::testing::Values(LayersCase{"kvarn_k4v2_g64", 64, 3, 130},
                                           LayersCase{"kvarn_k4v2_g128", 128, 8, 5},
                                           LayersCase{"fp16", 64, 3, 130}),
                         [](const auto& info) {
                           const LayersCase& c = info.param;
                           return c.dtype + "_d" + std::to_string(c.head_dim) + "_h" + std::to_string(c.heads) +
                                  "_layers" + std::to_string(c.layers);
                         });

// The layers of one call must be one cache's: a kernel is chosen, and the grid shaped, for the first. Refused before
// anything is launched, as are null jobs and a layer without memory (the pointers below are never dereferenced).
TEST(FlushFullTiles, RefusesLayersOfAnotherFormatAndMissingMemory) {
  auto* memory = test::fake_device_address<uint8_t>();
  const auto* jobs = test::fake_device_address<const TileFlushJob>();
  const auto layer = [&](const char* dtype, int heads, bool with_memory = true) {
    return make_kv_cache_layer(codec::parse_cache_dtype(dtype), 128, 128, heads, with_memory ? memory : nullptr,
                               reinterpret_cast<uint16_t*>(memory));
  };
  const std::vector<KvCacheLayer> other_heads = {layer("kvarn_k4v2_g128", 8), layer("kvarn_k4v2_g128", 4)};
  EXPECT_THAT([&] { flush_full_tiles(other_heads, jobs, 1, nullptr); },
              test::refused_with("flush_full_tiles: layer 1 has 4 kv heads"));
  const std::vector<KvCacheLayer> other_dtype = {layer("kvarn_k4v2_g128", 8), layer("kvarn_k4v4_g128", 8),
                                                 layer("kvarn_k4v2_g128", 8)};
  EXPECT_THAT([&] { flush_full_tiles(other_dtype, jobs, 1, nullptr); },
              test::refused_with("expected the layers of one cache"));
  const std::vector<KvCacheLayer> no_blocks = {layer("fp16", 8), layer("fp16", 8, false)};
  EXPECT_THAT([&] { flush_full_tiles(no_blocks, jobs, 1, nullptr); },
              test::refused_with("flush_full_tiles: layer 1 has no blocks"));
  EXPECT_THAT([&] { flush_full_tiles(layer("fp16", 8), nullptr, 1, nullptr); },
              test::refused_with("flush_full_tiles: jobs is null"));
}

// Negative counts are refused before anything is launched (they would have been a launch's invalid configuration).
TEST(AppendAndFlush, RefuseNegativeCounts) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  EXPECT_THAT([&] { append_to_tails(layer, nullptr, nullptr, nullptr, -1, nullptr); },
              test::refused_with("append_to_tails: num_rows -1; expected >= 0"));
  EXPECT_THAT([&] { flush_full_tiles(layer, nullptr, -2, nullptr); },
              test::refused_with("flush_full_tiles: num_jobs -2; expected >= 0"));
}

}  // namespace
}  // namespace kvarn::cuda
