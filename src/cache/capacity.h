#pragma once
// Capacity planning: how many tokens of KV history a memory budget holds for each cache dtype, counting tile
// metadata (scales) and the fp16 tail slot every running sequence keeps. fp16 and fp32 are charged no tail: a
// paged fp16 cache (vLLM's) writes the partial block in place, which makes the ratios conservative for KVarN.
#include "codec/cache_dtype.h"

#include <cstddef>
#include <cstdint>

namespace kvarn::cache {

struct CapacityQuery {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  double memory_bytes = 0;
  int max_num_seqs = 256;   // tail slots reserved
  int max_model_len = 0;    // for the concurrency column
  int block_size = 0;       // 0: the dtype's tile size, or 128
};

struct Capacity {
  int block_size = 0;
  double bytes_per_token = 0;   // all layers, amortized over full tiles
  double tail_bytes = 0;        // all reserved tail slots, all layers
  int64_t tokens = 0;           // that fit after the tails are reserved
  int64_t seqs_at_max_len = 0;  // sequences of max_model_len tokens that fit at once (at most max_num_seqs)
};

Capacity plan_capacity(const CapacityQuery& query, const codec::CacheDtype& dtype);

}  // namespace kvarn::cache
