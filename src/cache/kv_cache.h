#pragma once
// The paged KV cache's bookkeeping (the memory itself belongs to the backend): per-sequence block tables of full,
// immutable tiles, one fp16 tail slot per running sequence that receives new tokens, and the block allocator.
// A sequence of n tokens holds n / G full tiles and n % G tail tokens.
#include "cache/block_pool.h"
#include "codec/cache_dtype.h"
#include "codec/tile_layout.h"

#include <cstdint>
#include <vector>

namespace kvarn::cache {

struct KvCacheShape {
  codec::CacheDtype dtype;
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 128;  // G: tokens per tile
  int num_blocks = 0;
  int max_seqs = 1;  // tail slots

  codec::TileLayout tile_layout() const;
  size_t block_bytes_per_layer() const { return tile_layout().bytes * num_kv_heads; }
  size_t tail_bytes_per_layer() const {
    return size_t{2} * num_kv_heads * block_size * head_dim * dtype.tail_element_bytes();
  }
  // Bytes of the whole cache: blocks and tail slots of every layer.
  size_t total_bytes() const;

  // The most blocks that fit in `bytes` after reserving max_seqs tail slots; throws if not even one fits.
  static int blocks_for_budget(const KvCacheShape& shape, size_t bytes);
};

struct SequenceKv {
  std::vector<int32_t> blocks;  // full tiles, oldest first
  int tail_slot = -1;
  int tail_len = 0;
  int num_tokens(int block_size) const { return static_cast<int>(blocks.size()) * block_size + tail_len; }
};

// One full tail to encode into a fresh block (every layer, every kv-head).
struct TileFlush {
  int tail_slot;
  int32_t block;
};

class KvCache {
public:
  explicit KvCache(const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  int free_blocks() const { return pool_.num_free(); }
  int free_tail_slots() const { return static_cast<int>(free_slots_.size()); }

  // Claims a tail slot; throws kvarn::Error when all max_seqs slots are taken.
  int add_sequence();
  // Returns the sequence's blocks and tail slot.
  void free_sequence(int seq);
  const SequenceKv& sequence(int seq) const { return sequences_.at(seq); }

  // Tokens the tail can still take before it must be flushed: a step never appends more than this.
  int tail_room(int seq) const { return shape_.block_size - sequence(seq).tail_len; }
  // Records that the backend wrote n new rows into the sequence's tail.
  void advance(int seq, int n);
  // Gives every full tail a new block, appends it to the block table and empties the tail. The caller has the
  // backend encode each returned flush before the tail slot is written again. Throws if blocks run out: the
  // scheduler reserves them first (blocks_needed_to_flush).
  std::vector<TileFlush> take_full_tails();
  int blocks_needed_to_flush() const;

private:
  KvCacheShape shape_;
  BlockPool pool_;
  std::vector<int> free_slots_;
  std::vector<SequenceKv> sequences_;  // indexed by sequence id; freed ids are reused
  std::vector<bool> live_;
};

}  // namespace kvarn::cache
