// choose_tiles_per_split: the split sizes that measured fastest on the H200 (132 SMs; 3 KVarN CTAs or 1 fp16 CTA
// of the D 128 kernels per SM) and the bounds every choice keeps. Host-only: runs without a GPU.
#include "backend/cuda/decode_split_plan.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace kvarn::cuda {
namespace {

constexpr int kSms = 132, kKvHeads = 8;

DecodeGridShape kvarn_grid(int batch) { return {static_cast<long>(batch) * kKvHeads, 3L * kSms, 4}; }
DecodeGridShape fp16_grid(int batch) { return {static_cast<long>(batch) * kKvHeads, 1L * kSms, 1}; }

int splits(int max_tiles, int per_split) { return (max_tiles + per_split - 1) / per_split; }

// Batch 8 x 32K (255 tiles): 6 splits of 44, the last of 35 tiles. The 64 tail CTAs hold 64 of the 396 slots
// first, so 52 tile CTAs start a tail's time late: with split-major CTAs those are last splits, and 35 tiles let
// them finish with the rest. Measured (Llama / Qwen shape): 6 x 44 68.5 / 74.9 us, 6 x 43 71.1 / 78.1 us.
TEST(DecodeSplitPlan, GivesTheLateCtasAShorterLastSplit) {
  EXPECT_EQ(choose_tiles_per_split(255, kvarn_grid(8)), 44);
}

// Batch 8 x 8K (63 tiles): 6 splits of 12 (the last of 3), 25.9 / 31.1 us, against 27.8 / 33.6 us for 4 x 16.
TEST(DecodeSplitPlan, SpreadsAShortBatchOverTheSlots) {
  EXPECT_EQ(choose_tiles_per_split(63, kvarn_grid(8)), 12);
}

// A tail CTA costs about one fp16 tile: batch 8 x 1K (7 tiles) takes 2 x 4 (15.2 / 16.2 us, Llama / Qwen), not
// 2 x 6 (15.9 / 16.9 us, the choice when a tail was counted as 4 tiles).
TEST(DecodeSplitPlan, CountsATailAsOneFp16Tile) {
  EXPECT_EQ(choose_tiles_per_split(7, fp16_grid(8)), 4);
}

TEST(DecodeSplitPlan, SplitsStayWithinTheTilesAndTheSplitBound) {
  for (int batch : {1, 8, 32, 128, 1024})
    for (int max_tiles : {1, 7, 63, 255, 1023})
      for (const DecodeGridShape& grid : {kvarn_grid(batch), fp16_grid(batch)}) {
        const int per_split = choose_tiles_per_split(max_tiles, grid);
        ASSERT_GE(per_split, 1);
        ASSERT_LE(per_split, max_tiles);
        EXPECT_LE(splits(max_tiles, per_split), std::max(16L, 8 * grid.slots / grid.pairs))
            << "batch " << batch << ", " << max_tiles << " tiles";
      }
}

TEST(DecodeSplitPlan, EmptyCachesGetOneTilePerSplit) {
  EXPECT_EQ(choose_tiles_per_split(0, kvarn_grid(8)), 1);
  EXPECT_EQ(choose_tiles_per_split(1, fp16_grid(1)), 1);
}

}  // namespace
}  // namespace kvarn::cuda
