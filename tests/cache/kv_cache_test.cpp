// KvCache bookkeeping: tails fill to G tokens, full tails become blocks, freeing a sequence returns every block and
// its tail slot, and the budget planner counts tails and metadata.
#include "cache/kv_cache.h"

#include "util/error.h"

#include <gtest/gtest.h>

namespace kvarn::cache {
namespace {

KvCacheShape small_shape(int blocks, int seqs) {
  return {codec::parse_cache_dtype("kvarn_k4v2_g128"), 2, 2, 128, 128, blocks, seqs};
}

TEST(KvCache, FullTailsBecomeBlocksAndEverythingReturnsOnFree) {
  KvCache cache(small_shape(4, 2));
  const int a = cache.add_sequence(), b = cache.add_sequence();
  EXPECT_EQ(cache.free_tail_slots(), 0);
  EXPECT_THROW(cache.add_sequence(), Error);
  cache.advance(a, 100);
  cache.advance(b, 128);
  EXPECT_EQ(cache.tail_room(a), 28);
  EXPECT_THROW(cache.advance(a, 29), Error);
  EXPECT_EQ(cache.blocks_needed_to_flush(), 1);
  const auto flushes = cache.take_full_tails();
  ASSERT_EQ(flushes.size(), 1u);
  EXPECT_EQ(flushes[0].tail_slot, cache.sequence(b).tail_slot);
  EXPECT_EQ(cache.sequence(b).blocks.size(), 1u);
  EXPECT_EQ(cache.sequence(b).tail_len, 0);
  EXPECT_EQ(cache.sequence(b).num_tokens(128), 128);
  EXPECT_EQ(cache.free_blocks(), 3);
  cache.free_sequence(b);
  cache.free_sequence(a);
  EXPECT_EQ(cache.free_blocks(), 4);
  EXPECT_EQ(cache.free_tail_slots(), 2);
  EXPECT_THROW(cache.free_sequence(a), Error);
}

TEST(KvCache, RunningOutOfBlocksIsAnError) {
  KvCache cache(small_shape(1, 2));
  const int a = cache.add_sequence(), b = cache.add_sequence();
  cache.advance(a, 128);
  cache.advance(b, 128);
  EXPECT_EQ(cache.blocks_needed_to_flush(), 2);
  EXPECT_THROW(cache.take_full_tails(), Error);
}

TEST(KvCacheShape, BudgetCountsTailsAndTileMetadata) {
  auto shape = small_shape(0, 8);
  // Per layer: a block is 2 heads x 13,824 bytes; a tail slot 2 x 2 heads x 128 x 128 x 2 bytes.
  EXPECT_EQ(shape.block_bytes_per_layer(), 2u * 13824);
  EXPECT_EQ(shape.tail_bytes_per_layer(), 2u * 2 * 128 * 128 * 2);
  const size_t tails = 2 * shape.tail_bytes_per_layer() * 8;
  EXPECT_EQ(KvCacheShape::blocks_for_budget(shape, tails + 10 * 2 * shape.block_bytes_per_layer() + 5), 10);
  EXPECT_THROW(KvCacheShape::blocks_for_budget(shape, tails), Error);
}

}  // namespace
}  // namespace kvarn::cache
