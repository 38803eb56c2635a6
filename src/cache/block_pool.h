#pragma once
// The allocator of KV blocks. A block id names the same slot in every layer's pool (as in vLLM), so one
// allocation serves the whole model. Blocks are reference-counted so that immutable full tiles can later be
// shared between sequences (prefix caching).
#include <cstdint>
#include <vector>

namespace kvarn::cache {

class BlockPool {
public:
  explicit BlockPool(int num_blocks);

  int num_blocks() const { return static_cast<int>(ref_counts_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }

  // Returns a block with reference count 1; throws kvarn::Error when none is free (callers check num_free first).
  int32_t allocate();
  void retain(int32_t block);
  // Drops one reference; the block returns to the pool at zero.
  void release(int32_t block);

private:
  std::vector<int32_t> free_;  // LIFO: a freed block is reused first, while it is still warm in cache
  std::vector<int32_t> ref_counts_;
};

}  // namespace kvarn::cache
