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
#include <string_view>

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

// KvCacheLayer is a plain struct, so every kernel entry point checks it first: throws kvarn::Error naming `who`, the
// field and what was expected unless the layer is one make_kv_cache_layer could have built (num_kv_heads > 0, D and G
// 64 or 128, the layout of `method`: TileLayout::codes(D, G, 4, 2 or 4) or TileLayout::plain(D, G, 16) for fp16).
// blocks and tails may be null (a plan is made without memory); where set they must be 16-byte aligned.
void check_kv_cache_layer(const KvCacheLayer& cache, const char* who);

// Throws kvarn::Error naming `who` unless `scale` (the softmax scale) is finite and positive: a scale left at its
// default 0 would give every key the same weight, and the kernel would return the values' mean without a word.
void check_softmax_scale(float scale, int head_dim, const char* who);

// Throws kvarn::Error naming `who` and `name` unless `pointer` is non-null and `alignment`-aligned: a null device
// array faults on the device, a misaligned one in the kernels' 16-byte accesses (cp.async, vector loads). `holds`
// says what it is, e.g. "[num_seqs][num_q_heads][D] fp16".
void check_device_memory(const void* pointer, size_t alignment, const char* who, const char* name,
                         std::string_view holds);

// One sequence as attention reads it: its full tiles are block_tables[block_table_offset ..+ num_tiles], its
// tail holds tail_len (0..G-1) tokens in slot tail_slot.
struct SequenceKvView {
  int32_t block_table_offset = 0;
  int32_t num_tiles = 0;
  int32_t tail_len = 0;
  int32_t tail_slot = 0;
};

}  // namespace kvarn::cuda
