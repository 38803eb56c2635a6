#include "cache/kv_cache.h"

#include "codec/tile_codec.h"
#include "util/error.h"

namespace kvarn::cache {

codec::TileLayout KvCacheShape::tile_layout() const {
  return codec::TileCodec(dtype, head_dim, block_size).layout();
}

size_t KvCacheShape::total_bytes() const {
  return static_cast<size_t>(num_layers) *
         (block_bytes_per_layer() * static_cast<size_t>(num_blocks) + tail_bytes_per_layer() * max_seqs);
}

int KvCacheShape::blocks_for_budget(const KvCacheShape& shape, size_t bytes) {
  const size_t tails = static_cast<size_t>(shape.num_layers) * shape.tail_bytes_per_layer() * shape.max_seqs;
  const size_t per_block = static_cast<size_t>(shape.num_layers) * shape.block_bytes_per_layer();
  if (bytes < tails + per_block)
    throw Error("KV cache: {:.1f} MiB cannot hold {} tail slots ({:.1f} MiB) and one block ({:.1f} MiB); "
                "lower --max-num-seqs or give the cache more memory",
                bytes / 1048576.0, shape.max_seqs, tails / 1048576.0, per_block / 1048576.0);
  return static_cast<int>((bytes - tails) / per_block);
}

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape), pool_(shape.num_blocks) {
  shape_.tile_layout();  // validates dtype, head_dim and block size
  if (shape.max_seqs <= 0) throw Error("--max-num-seqs {}: expected at least 1", shape.max_seqs);
  for (int slot = shape.max_seqs - 1; slot >= 0; --slot) free_slots_.push_back(slot);
}

int KvCache::add_sequence() {
  if (free_slots_.empty())
    throw Error("KV cache: all {} tail slots are in use (--max-num-seqs)", shape_.max_seqs);
  SequenceKv seq;
  seq.tail_slot = free_slots_.back();
  free_slots_.pop_back();
  for (size_t id = 0; id < sequences_.size(); ++id)
    if (!live_[id]) {
      sequences_[id] = std::move(seq);
      live_[id] = true;
      return static_cast<int>(id);
    }
  sequences_.push_back(std::move(seq));
  live_.push_back(true);
  return static_cast<int>(sequences_.size()) - 1;
}

void KvCache::free_sequence(int id) {
  if (id < 0 || id >= static_cast<int>(sequences_.size()) || !live_[id])
    throw Error("KV cache: free of unknown sequence {}", id);
  for (int32_t block : sequences_[id].blocks) pool_.release(block);
  free_slots_.push_back(sequences_[id].tail_slot);
  sequences_[id] = SequenceKv{};
  live_[id] = false;
}

void KvCache::advance(int id, int n) {
  SequenceKv& seq = sequences_.at(id);
  if (n < 0 || seq.tail_len + n > shape_.block_size)
    throw Error("KV cache: sequence {} tail holds {} of {} tokens and cannot take {} more", id, seq.tail_len,
                shape_.block_size, n);
  seq.tail_len += n;
}

int KvCache::blocks_needed_to_flush() const {
  int needed = 0;
  for (size_t id = 0; id < sequences_.size(); ++id)
    if (live_[id] && sequences_[id].tail_len == shape_.block_size) ++needed;
  return needed;
}

std::vector<TileFlush> KvCache::take_full_tails() {
  std::vector<TileFlush> flushes;
  for (size_t id = 0; id < sequences_.size(); ++id) {
    SequenceKv& seq = sequences_[id];
    if (!live_[id] || seq.tail_len < shape_.block_size) continue;
    const int32_t block = pool_.allocate();
    seq.blocks.push_back(block);
    seq.tail_len = 0;
    flushes.push_back({seq.tail_slot, block});
  }
  return flushes;
}

}  // namespace kvarn::cache
