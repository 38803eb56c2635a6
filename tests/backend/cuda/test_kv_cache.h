#pragma once
// A paged KV cache filled the way the engine fills it, for the attention kernel tests: full tiles encoded by the
// CPU codec into shuffled blocks, the remaining tokens rotated into fp16 tail slots (slots assigned in reverse),
// unused block bytes and tail positions poisoned (0xff: fp16 NaN) so that reading them fails a test. Alongside:
// what attention must see, in float64 and the storage space (tiles as codec::TileCodec::decode gives them).
#include "backend/cuda/kv_layout.h"
#include "codec/cache_dtype.h"
#include "codec/synthetic_kv.h"
#include "codec/tile_codec.h"
#include "cuda_test_support.h"
#include "util/half.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace kvarn::cuda::test {

struct SeqSpec {
  int tiles;
  int tail;
};

// Keys and values of sequence s, [tokens][kv_heads][D], model space.
using KvSource = std::function<std::pair<std::vector<float>, std::vector<float>>(int seq, int tokens)>;

// Keys and values of the synthetic generator (outlier channels, attention sinks) for every kv-head: `options`
// with the sequence's token count and a seed per (sequence, kv-head).
inline KvSource synthetic_kv_source(int kv_heads, int head_dim, codec::SyntheticKvOptions options) {
  return [=](int s, int tokens) {
    std::vector<float> k(static_cast<size_t>(tokens) * kv_heads * head_dim), v(k.size());
    for (int h = 0; h < kv_heads; ++h) {
      codec::SyntheticKvOptions o = options;
      o.tokens = std::max(tokens, 1);
      o.head_dim = head_dim;
      o.seed = options.seed + 31u * static_cast<uint32_t>(s) + static_cast<uint32_t>(h);
      const auto syn = codec::synthetic_kv(o);
      for (int t = 0; t < tokens; ++t)
        for (int c = 0; c < head_dim; ++c) {
          k[(static_cast<size_t>(t) * kv_heads + h) * head_dim + c] = syn.keys[t * head_dim + c];
          v[(static_cast<size_t>(t) * kv_heads + h) * head_dim + c] = syn.values[t * head_dim + c];
        }
    }
    return std::pair{k, v};
  };
}

// Keys and values drawn from N(0, 1) by `rng` (which must outlive the source).
inline KvSource normal_kv_source(int kv_heads, int head_dim, std::mt19937& rng) {
  return [kv_heads, head_dim, &rng](int, int tokens) {
    std::normal_distribution<float> normal;
    std::vector<float> k(static_cast<size_t>(tokens) * kv_heads * head_dim), v(k.size());
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    return std::pair{k, v};
  };
}

// `count` values of N(0, scale^2).
inline std::vector<float> normal_values(size_t count, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> out(count);
  for (auto& x : out) x = normal(rng) * scale;
  return out;
}

// The captured post-RoPE keys/values of one layer ([kv_heads][tokens][D]) as every sequence's K/V, repeating
// from the start when a sequence is longer than the capture.
inline KvSource captured_kv_source(const CapturedTensor& k, const CapturedTensor& v) {
  return [&k, &v](int, int tokens) {
    const int kv_heads = k.shape[0], captured = k.shape[1], d = k.shape[2];
    std::vector<float> keys(static_cast<size_t>(tokens) * kv_heads * d), values(keys.size());
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < kv_heads; ++h)
        for (int c = 0; c < d; ++c) {
          const size_t src = (static_cast<size_t>(h) * captured + t % captured) * d + c;
          keys[(static_cast<size_t>(t) * kv_heads + h) * d + c] = half_to_float(k.data[src]);
          values[(static_cast<size_t>(t) * kv_heads + h) * d + c] = half_to_float(v.data[src]);
        }
    return std::pair{keys, values};
  };
}

// Queries for `rows` rows of q_heads heads: captured keys of random tokens (post-RoPE, so they score like real
// queries), q head h taking kv-head h / (q_heads / kv_heads).
inline std::vector<float> captured_queries(const CapturedTensor& k, int rows, int q_heads, std::mt19937& rng) {
  const int kv_heads = k.shape[0], captured = k.shape[1], d = k.shape[2], group = q_heads / kv_heads;
  std::vector<float> q(static_cast<size_t>(rows) * q_heads * d);
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < q_heads; ++h) {
      const int t = std::uniform_int_distribution<int>(0, captured - 1)(rng);
      for (int c = 0; c < d; ++c)
        q[(static_cast<size_t>(r) * q_heads + h) * d + c] =
            half_to_float(k.data[(static_cast<size_t>(h / group) * captured + t) * d + c]);
    }
  return q;
}

inline void hadamard_double(double* x, int d) {
  for (int step = 1; step < d; step *= 2)
    for (int block = 0; block < d; block += 2 * step)
      for (int i = block; i < block + step; ++i) {
        const double a = x[i], b = x[i + step];
        x[i] = a + b;
        x[i + step] = a - b;
      }
  for (int i = 0; i < d; ++i) x[i] /= std::sqrt(static_cast<double>(d));
}

// The tile size the kernels use for a dtype: its own G, or for fp16 the block size asked for (0: the engine's
// default, codec::resolve_block_size).
inline int tile_tokens_for(const codec::CacheDtype& dtype, int block_size = 0) {
  return codec::resolve_block_size(dtype, block_size);
}

struct TestCache {
  codec::CacheDtype dtype;
  int head_dim = 0, tile_tokens = 0, kv_heads = 0;
  std::vector<uint8_t> blocks;
  std::vector<uint16_t> tails;
  // Each sequence's entries, then a poisoned block's, so that a kernel reading past a sequence's tiles reads NaN
  // scales and fp16 rows, not the next sequence's tiles.
  std::vector<int32_t> tables;
  std::vector<SequenceKvView> views;
  // stored_k[s][h]: [tokens][D] of sequence s, kv-head h, storage space; stored_v likewise.
  std::vector<std::vector<std::vector<double>>> stored_k, stored_v;
};

// block_size: as tile_tokens_for takes it.
inline TestCache build_test_cache(const std::string& dtype_name, int d, int kv_heads,
                                  const std::vector<SeqSpec>& specs, const KvSource& kv, std::mt19937& rng,
                                  int block_size = 0) {
  TestCache cache;
  cache.dtype = codec::parse_cache_dtype(dtype_name);
  const int g = tile_tokens_for(cache.dtype, block_size), num_seqs = static_cast<int>(specs.size());
  cache.head_dim = d, cache.tile_tokens = g, cache.kv_heads = kv_heads;
  const codec::TileCodec codec(cache.dtype, d, g);
  const codec::TileLayout& l = codec.layout();
  int total_tiles = 0;
  for (const auto& s : specs) total_tiles += s.tiles;
  const int num_blocks = total_tiles + 3;
  std::vector<int32_t> free_blocks(num_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng);
  const int32_t poisoned_block = free_blocks.back();
  free_blocks.pop_back();

  const KvCacheLayer shape = make_kv_cache_layer(cache.dtype, d, g, kv_heads, nullptr, nullptr);
  cache.blocks.assign(shape.block_bytes() * num_blocks, 0xff);
  cache.tails.assign(shape.tail_slot_elements() * num_seqs, 0xffff);
  cache.stored_k.assign(num_seqs, std::vector<std::vector<double>>(kv_heads));
  cache.stored_v = cache.stored_k;
  std::vector<float> tk(static_cast<size_t>(g) * d), tv(tk.size()), dk(tk.size()), dv(tk.size());
  for (int s = 0; s < num_seqs; ++s) {
    auto [k, v] = kv(s, specs[s].tiles * g + specs[s].tail);
    for (auto& x : k) x = round_to_half(x);
    for (auto& x : v) x = round_to_half(x);
    const int slot = num_seqs - 1 - s;
    cache.views.push_back({static_cast<int32_t>(cache.tables.size()), specs[s].tiles, specs[s].tail, slot});
    auto at = [&](const std::vector<float>& x, int t, int h, int c) {
      return x[(static_cast<size_t>(t) * kv_heads + h) * d + c];
    };
    for (int i = 0; i < specs[s].tiles; ++i) {
      const int32_t block = free_blocks.back();
      free_blocks.pop_back();
      cache.tables.push_back(block);
      for (int h = 0; h < kv_heads; ++h) {
        for (int t = 0; t < g; ++t)
          for (int c = 0; c < d; ++c) tk[t * d + c] = at(k, i * g + t, h, c), tv[t * d + c] = at(v, i * g + t, h, c);
        uint8_t* tile = cache.blocks.data() + (static_cast<size_t>(block) * kv_heads + h) * l.bytes;
        codec.encode(tk.data(), tv.data(), tile);
        codec.decode(tile, dk.data(), dv.data());
        cache.stored_k[s][h].insert(cache.stored_k[s][h].end(), dk.begin(), dk.end());
        cache.stored_v[s][h].insert(cache.stored_v[s][h].end(), dv.begin(), dv.end());
      }
    }
    for (int t = 0; t < specs[s].tail; ++t)
      for (int h = 0; h < kv_heads; ++h)
        for (int which = 0; which < 2; ++which) {
          std::vector<double> row(d);
          for (int c = 0; c < d; ++c) row[c] = at(which == 0 ? k : v, specs[s].tiles * g + t, h, c);
          if (cache.dtype.rotated()) hadamard_double(row.data(), d);
          uint16_t* dst = cache.tails.data() + (((static_cast<size_t>(slot) * 2 + which) * kv_heads + h) * g + t) * d;
          for (int c = 0; c < d; ++c) {
            dst[c] = float_to_half(static_cast<float>(row[c]));
            (which == 0 ? cache.stored_k : cache.stored_v)[s][h].push_back(half_to_float(dst[c]));
          }
        }
    cache.tables.push_back(poisoned_block);
  }
  if (cache.tables.empty()) cache.tables.push_back(poisoned_block);
  return cache;
}

}  // namespace kvarn::cuda::test
