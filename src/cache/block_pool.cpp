#include "cache/block_pool.h"

#include "util/error.h"

namespace kvarn::cache {

BlockPool::BlockPool(int num_blocks) : ref_counts_(num_blocks, 0) {
  if (num_blocks <= 0) throw Error("KV cache: {} blocks requested; expected at least one", num_blocks);
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int32_t BlockPool::allocate() {
  if (free_.empty()) throw Error("KV cache: all {} blocks are in use", num_blocks());
  const int32_t block = free_.back();
  free_.pop_back();
  ref_counts_[block] = 1;
  return block;
}

void BlockPool::retain(int32_t block) {
  if (block < 0 || block >= num_blocks() || ref_counts_[block] == 0)
    throw Error("KV cache: retain of block {} which is not allocated", block);
  ++ref_counts_[block];
}

void BlockPool::release(int32_t block) {
  if (block < 0 || block >= num_blocks() || ref_counts_[block] == 0)
    throw Error("KV cache: release of block {} which is not allocated", block);
  if (--ref_counts_[block] == 0) free_.push_back(block);
}

}  // namespace kvarn::cache
