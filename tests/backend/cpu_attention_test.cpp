// CPU attention over the paged cache equals float64 attention over the decoded cache contents, for every cache
// dtype: tiles read through folded scales, the fp16 tail, causal masking within a step, GQA, several sequences of
// ragged lengths in one step, and tiles flushed between steps.
#include "backend/cpu/cpu_backend.h"

#include "codec/hadamard.h"
#include "codec/synthetic_kv.h"
#include "codec/tile_codec.h"
#include "util/half.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace kvarn::backend {
namespace {

constexpr int kLayers = 1, kKvHeads = 2, kQHeads = 4;

struct Harness {
  cache::KvCacheShape shape;
  CpuBackend backend{2};
  cache::KvCache cache;
  codec::TileCodec codec;
  // What the cache holds for each sequence, per kv-head, in the storage space: [token][D].
  std::vector<std::vector<std::vector<float>>> stored_k, stored_v;

  Harness(const std::string& dtype, int d, int g)
      : shape{codec::parse_cache_dtype(dtype), kLayers, kKvHeads, d, g, 16, 4},
        cache(shape),
        codec(shape.dtype, d, g) {
    backend.allocate_kv_cache(shape);
  }

  // Runs one step: appends rows[s] new tokens per sequence and returns the attention output [rows][q_heads*D].
  std::vector<float> step(const std::vector<int>& seq_ids, const std::vector<int>& rows, std::mt19937& rng) {
    const int d = shape.head_dim;
    int total = 0;
    std::vector<StepSequence> seqs;
    for (size_t s = 0; s < seq_ids.size(); ++s) {
      const auto& kv = cache.sequence(seq_ids[s]);
      seqs.push_back({kv.blocks.data(), static_cast<int>(kv.blocks.size()), kv.tail_slot, kv.tail_len, total,
                      rows[s]});
      total += rows[s];
    }
    std::normal_distribution<float> normal;
    std::vector<float> q(static_cast<size_t>(total) * kQHeads * d), k(static_cast<size_t>(total) * kKvHeads * d),
        v(k.size()), out(q.size(), NAN);
    for (auto& x : q) x = normal(rng);
    for (auto& x : k) x = 2.0f * normal(rng);
    for (auto& x : v) x = normal(rng);
    Tensor qt{q.data(), total, kQHeads * d}, kt{k.data(), total, kKvHeads * d}, vt{v.data(), total, kKvHeads * d},
        ot{out.data(), total, kQHeads * d};
    backend.kv_append(0, seqs, kt, vt);
    backend.attention(0, seqs, qt, kQHeads, 1.0f / std::sqrt(static_cast<float>(d)), ot);

    std::vector<float> expected(out.size());
    for (size_t s = 0; s < seq_ids.size(); ++s) {
      const int id = seq_ids[s];
      for (int r = 0; r < rows[s]; ++r)
        for (int h = 0; h < kKvHeads; ++h) {
          auto row_k = std::vector<float>(k.begin() + ((seqs[s].first_row + r) * kKvHeads + h) * d,
                                          k.begin() + ((seqs[s].first_row + r) * kKvHeads + h + 1) * d);
          auto row_v = std::vector<float>(v.begin() + ((seqs[s].first_row + r) * kKvHeads + h) * d,
                                          v.begin() + ((seqs[s].first_row + r) * kKvHeads + h + 1) * d);
          if (shape.dtype.rotated()) codec::hadamard_rotate(row_k.data(), d), codec::hadamard_rotate(row_v.data(), d);
          if (shape.dtype.tail_element_bytes() == 2) {  // the tail is fp16
            for (auto& x : row_k) x = round_to_half(x);
            for (auto& x : row_v) x = round_to_half(x);
          }
          stored_k[id][h].insert(stored_k[id][h].end(), row_k.begin(), row_k.end());
          stored_v[id][h].insert(stored_v[id][h].end(), row_v.begin(), row_v.end());
        }
      const int before = cache.sequence(id).num_tokens(shape.block_size);
      for (int r = 0; r < rows[s]; ++r)
        for (int head = 0; head < kQHeads; ++head) {
          const int h = head / (kQHeads / kKvHeads);
          std::vector<double> qr(q.begin() + ((seqs[s].first_row + r) * kQHeads + head) * d,
                                 q.begin() + ((seqs[s].first_row + r) * kQHeads + head + 1) * d);
          std::vector<float> qf(qr.begin(), qr.end());
          if (shape.dtype.rotated()) codec::hadamard_rotate(qf.data(), d);
          const int n = before + r + 1;
          std::vector<double> p(n);
          double max = -1e300, sum = 0;
          for (int t = 0; t < n; ++t) {
            double dot = 0;
            for (int c = 0; c < d; ++c) dot += static_cast<double>(qf[c]) * stored_k[id][h][t * d + c];
            p[t] = dot / std::sqrt(static_cast<double>(d));
            max = std::max(max, p[t]);
          }
          for (auto& x : p) sum += (x = std::exp(x - max));
          std::vector<float> o(d, 0.0f);
          for (int c = 0; c < d; ++c) {
            double acc = 0;
            for (int t = 0; t < n; ++t) acc += p[t] / sum * stored_v[id][h][t * d + c];
            o[c] = static_cast<float>(acc);
          }
          if (shape.dtype.rotated()) codec::hadamard_rotate(o.data(), d);
          std::copy(o.begin(), o.end(), expected.begin() + ((seqs[s].first_row + r) * kQHeads + head) * d);
        }
      cache.advance(id, rows[s]);
    }
    // Full tails become tiles: from now on the reference sees the decoded tile, as attention will.
    for (const auto& flush : cache.take_full_tails()) {
      backend.kv_flush(std::span(&flush, 1));
      for (size_t id = 0; id < stored_k.size(); ++id) {
        if (cache.sequence(static_cast<int>(id)).tail_slot != flush.tail_slot) continue;
        const int g = shape.block_size, start = static_cast<int>(stored_k[id][0].size()) / d - g;
        for (int h = 0; h < kKvHeads; ++h) {
          std::vector<uint8_t> tile(codec.layout().bytes);
          codec.encode_stored(stored_k[id][h].data() + start * d, stored_v[id][h].data() + start * d, tile.data());
          codec.decode(tile.data(), stored_k[id][h].data() + start * d, stored_v[id][h].data() + start * d);
        }
      }
    }
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_TRUE(std::isfinite(out[i])) << i;  // the output was poisoned with NaN
      num += (out[i] - expected[i]) * (out[i] - expected[i]);
      den += expected[i] * expected[i];
    }
    last_error = std::sqrt(num / den);
    return out;
  }

  double last_error = 0;
};

class CpuAttention : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

// Budget: 1e-5 relative (fp32 accumulation against float64 on the same decoded data).
TEST_P(CpuAttention, MatchesFloat64AttentionOverTheDecodedCache) {
  const auto [dtype, d] = GetParam();
  const int g = codec::parse_cache_dtype(dtype).tile_tokens ? codec::parse_cache_dtype(dtype).tile_tokens : 64;
  Harness h(dtype, d, g);
  std::mt19937 rng(1234);
  const int a = h.cache.add_sequence(), b = h.cache.add_sequence(), c = h.cache.add_sequence();
  h.stored_k.assign(3, std::vector<std::vector<float>>(kKvHeads));
  h.stored_v = h.stored_k;
  // Prefill in tile-aligned chunks of ragged sizes, then decode steps crossing tile boundaries.
  const std::vector<std::vector<int>> schedule = {
      {g, 1, g - 1}, {g - 1, g - 1, 1}, {1, 1, 1}, {g, 1, g - 1}, {1, 1, 1}, {1, g - 3, 1}};
  for (const auto& rows : schedule) {
    h.step({a, b, c}, rows, rng);
    EXPECT_LT(h.last_error, 1e-5) << dtype << " d=" << d;
  }
  EXPECT_GE(h.cache.sequence(a).blocks.size(), 2u);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuAttention,
                         ::testing::Combine(::testing::Values("fp32", "fp16", "fp8_e4m3", "rtn_k4v2_g128", "rot_k4v2_g128",
                                                              "kvarn_k4v2_g128", "kvarn_k4v4_g128", "kvarn_k4v2_g64",
                                                              "kvarn_k4v4_g64"),
                                            ::testing::Values(64, 128)));

}  // namespace
}  // namespace kvarn::backend
