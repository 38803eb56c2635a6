#include "cache/capacity.h"

#include "cache/kv_cache.h"
#include "util/error.h"

#include <algorithm>
#include <cmath>

namespace kvarn::cache {

Capacity plan_capacity(const CapacityQuery& q, const codec::CacheDtype& dtype) {
  if (!(q.memory_bytes > 0)) throw Error("--memory-gb: expected a positive amount of memory");
  if (q.max_num_seqs < 1) throw Error("--max-num-seqs {}: expected at least 1", q.max_num_seqs);
  if (q.max_model_len < 1) throw Error("--max-model-len {}: expected at least 1", q.max_model_len);
  KvCacheShape shape{dtype, q.num_layers, q.num_kv_heads, q.head_dim, codec::resolve_block_size(dtype, q.block_size),
                     0, q.max_num_seqs};
  const bool has_tail = dtype.method != codec::Method::fp16 && dtype.method != codec::Method::fp32;
  const double block_bytes = static_cast<double>(shape.block_bytes_per_layer()) * q.num_layers;
  const double tail_per_seq = has_tail ? static_cast<double>(shape.tail_bytes_per_layer()) * q.num_layers : 0.0;

  Capacity c;
  c.block_size = shape.block_size;
  c.bytes_per_token = block_bytes / shape.block_size;
  c.tail_bytes = tail_per_seq * q.max_num_seqs;
  const double left = q.memory_bytes - c.tail_bytes;
  c.tokens = left > 0 ? static_cast<int64_t>(std::floor(left / block_bytes)) * shape.block_size : 0;
  const double blocks_per_seq = std::ceil(static_cast<double>(q.max_model_len) / shape.block_size);
  c.seqs_at_max_len = std::min<int64_t>(
      q.max_num_seqs, static_cast<int64_t>(std::floor(q.memory_bytes / (tail_per_seq + blocks_per_seq * block_bytes))));
  return c;
}

}  // namespace kvarn::cache
