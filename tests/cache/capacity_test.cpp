// Capacity planning: KVarN k4v2_g128 at head_dim 128 holds >= 4.7x the tokens of fp16 at long context (few
// tail slots), tails are charged per reserved sequence, and bad budgets are refused.
#include "cache/capacity.h"

#include "util/error.h"

#include <gtest/gtest.h>

namespace kvarn::cache {
namespace {

const CapacityQuery kLlama3_8b{32, 8, 128, 80e9, 8, 131072, 0};

TEST(Capacity, KvarnHoldsAtLeast4_7xFp16AtLongContext) {
  const auto fp16 = plan_capacity(kLlama3_8b, codec::parse_cache_dtype("fp16"));
  const auto kvarn = plan_capacity(kLlama3_8b, codec::parse_cache_dtype("kvarn_k4v2_g128"));
  EXPECT_EQ(fp16.bytes_per_token, 2.0 * 32 * 8 * 128 * 2);
  EXPECT_EQ(kvarn.bytes_per_token, 13824.0 * 8 * 32 / 128);
  EXPECT_GE(static_cast<double>(kvarn.tokens) / fp16.tokens, 4.7);
  auto concurrent = kLlama3_8b;
  concurrent.max_num_seqs = 64;
  EXPECT_EQ(plan_capacity(concurrent, codec::parse_cache_dtype("fp16")).seqs_at_max_len, 4);  // 16 GiB each
  EXPECT_GE(plan_capacity(concurrent, codec::parse_cache_dtype("kvarn_k4v2_g128")).seqs_at_max_len, 20);
}

TEST(Capacity, TailsAreChargedPerReservedSequence) {
  auto many = kLlama3_8b;
  many.max_num_seqs = 256;
  const auto dtype = codec::parse_cache_dtype("kvarn_k4v2_g128");
  const auto few = plan_capacity(kLlama3_8b, dtype), lots = plan_capacity(many, dtype);
  EXPECT_EQ(lots.tail_bytes, 32.0 * few.tail_bytes);
  EXPECT_EQ(few.tail_bytes, 8.0 * 32 * 2 * 8 * 128 * 128 * 2);
  EXPECT_LT(lots.tokens, few.tokens);
}

TEST(Capacity, RefusesBadQueries) {
  auto q = kLlama3_8b;
  q.memory_bytes = 0;
  EXPECT_THROW(plan_capacity(q, codec::parse_cache_dtype("fp16")), Error);
  q = kLlama3_8b;
  q.block_size = 64;
  EXPECT_THROW(plan_capacity(q, codec::parse_cache_dtype("kvarn_k4v2_g128")), Error);
}

}  // namespace
}  // namespace kvarn::cache
