#pragma once
// The device memory of one layer's KV cache, as the CUDA kernels see it (the CPU cache uses the same layout):
//   blocks  [num_blocks][num_kv_heads][layout.bytes]     full, immutable tiles; a tile is codec/tile_layout.h's
//                                                        (KVarN codes, or fp16 keys [G][D] then values [G][D])
//   tails   [num_slots][2 (K, V)][num_kv_heads][G][D]    fp16, the newest n mod G tokens of a sequence,
//                                                        Hadamard-rotated for rotated dtypes, unrotated for fp16
// fp16 values cross the host API as uint16_t bit patterns (IEEE binary16), so that plain C++ can include this.
#include "codec/cache_dtype.h"
#include "codec/tile_layout.h"

#include <cstddef>
#include <cstdint>

namespace kvarn::cuda {

struct KvCacheLayer {
  uint8_t* blocks = nullptr;
  uint16_t* tails = nullptr;
  int num_kv_heads = 0;
  codec::Method method = codec::Method::fp16;
  codec::TileLayout layout;  // head_dim D, tokens G, bits, byte offsets

  int head_dim() const { return layout.head_dim; }
  int tile_tokens() const { return layout.tokens; }
  bool rotated() const { return method == codec::Method::rot || method == codec::Method::kvarn; }
  bool normalized() const { return method == codec::Method::kvarn; }
  size_t block_bytes() const { return layout.bytes * static_cast<size_t>(num_kv_heads); }
  // Elements (fp16) of one tail slot: K and V of every kv-head.
  size_t tail_slot_elements() const { return size_t{2} * num_kv_heads * layout.tokens * layout.head_dim; }
};

// Builds the view for a cache dtype (KVarN presets, rtn/rot ablations, fp16 with G = the block size).
// Throws kvarn::Error for dtypes the CUDA kernels do not serve (fp8) or unsupported head_dim / G.
KvCacheLayer make_kv_cache_layer(const codec::CacheDtype& dtype, int head_dim, int tile_tokens, int num_kv_heads,
                                 uint8_t* blocks, uint16_t* tails);

// One sequence as attention reads it: its full tiles are block_tables[block_table_offset ..+ num_tiles], its
// tail holds tail_len (0..G-1) tokens in slot tail_slot.
struct SequenceKvView {
  int32_t block_table_offset = 0;
  int32_t num_tiles = 0;
  int32_t tail_len = 0;
  int32_t tail_slot = 0;
};

}  // namespace kvarn::cuda
