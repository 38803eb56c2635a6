// choose_tiles_per_split: the split sizes that measured fastest on the H200 (132 SMs; 3 KVarN CTAs or 1 fp16 CTA
// of the D 128 kernels per SM) and the bounds every choice keeps. Host-only: runs without a GPU.
#include "backend/cuda/decode_split_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

namespace kvarn::cuda {
namespace {

constexpr int kSms = 132, kKvHeads = 8;

constexpr DecodeGridShape kKvarnGrid{kKvHeads, 3L * kSms, 4}, kFp16Grid{kKvHeads, 1L * kSms, 1};

std::vector<int> uniform(int batch, int tiles) { return std::vector<int>(batch, tiles); }

// Sequence s of the batch holds (s + 1) / batch of the context (the benchmark's ragged rows): tiles of G = 128.
std::vector<int> ragged(int batch, int context) {
  std::vector<int> tiles;
  for (int s = 0; s < batch; ++s)
    tiles.push_back(std::max(0, static_cast<int>(1L * context * (s + 1) / batch) / 128 - 1));
  return tiles;
}

int splits(int max_tiles, int per_split) { return (max_tiles + per_split - 1) / per_split; }

// Batch 8 x 32K (255 tiles): 6 splits of 44, the last of 35 tiles. The 64 tail CTAs hold 64 of the 396 slots
// first, so 52 tile CTAs start a tail's time late: with split-major CTAs those are last splits, and 35 tiles let
// them finish with the rest. Measured (Llama / Qwen shape): 6 x 44 68.5 / 74.9 us, 6 x 43 71.1 / 78.1 us.
TEST(DecodeSplitPlan, GivesTheLateCtasAShorterLastSplit) {
  EXPECT_EQ(choose_tiles_per_split(uniform(8, 255), kKvarnGrid), 44);
}

// Batch 8 x 8K (63 tiles): 6 splits of 12 (the last of 3), 25.9 / 31.1 us, against 27.8 / 33.6 us for 4 x 16.
TEST(DecodeSplitPlan, SpreadsAShortBatchOverTheSlots) {
  EXPECT_EQ(choose_tiles_per_split(uniform(8, 63), kKvarnGrid), 12);
}

// A tail CTA costs about one fp16 tile: batch 8 x 1K (7 tiles) takes 2 x 4 (15.2 / 16.2 us, Llama / Qwen), not
// 2 x 6 (15.9 / 16.9 us, the choice when a tail was counted as 4 tiles).
TEST(DecodeSplitPlan, CountsATailAsOneFp16Tile) {
  EXPECT_EQ(choose_tiles_per_split(uniform(8, 7), kFp16Grid), 4);
}

// A ragged batch is split by its own CTAs, not as if every sequence were as long as its longest. Batch 8 with
// sequences of 4K, 8K, ... 32K (H200, Llama / Qwen shape, us): 10 x 28 tiles, 44.9 / 48.9, against the uniform
// batch's 6 x 44, 55.5 / 64.2 (and 8 x 32 43.8 / 50.3, 11 x 24 44.8 / 48.1, 16 x 16 44.0 / 50.0); at 1K ... 8K
// 8 x 8, 17.7 / 20.5, against 6 x 12, 21.1 / 24.5.
TEST(DecodeSplitPlan, SplitsARaggedBatchByItsOwnTiles) {
  EXPECT_EQ(choose_tiles_per_split(ragged(8, 32768), kKvarnGrid), 28);
  EXPECT_EQ(choose_tiles_per_split(ragged(8, 8192), kKvarnGrid), 8);
}

// Beyond two waves of the uniform plan the model mispredicts ragged grids: batch 32 at up to 8K is split as the
// uniform batch, 3 x 24 (44.5 / 50.0 us), not as its own CTAs would have it, 2 x 32 (48.3 / 56.3).
TEST(DecodeSplitPlan, PlansALargeRaggedBatchAsItsLongestSequences) {
  EXPECT_EQ(choose_tiles_per_split(ragged(32, 8192), kKvarnGrid), choose_tiles_per_split(uniform(32, 63), kKvarnGrid));
  EXPECT_EQ(choose_tiles_per_split(ragged(32, 8192), kKvarnGrid), 24);
}

// A uniform batch is one length: the same choice from its tiles in any order, and from the longest sequence's tiles
// when the others are empty (their pairs' CTAs are only the tails).
TEST(DecodeSplitPlan, CountsTheCtasOfEverySequence) {
  std::vector<int> shuffled = ragged(8, 32768);
  std::reverse(shuffled.begin(), shuffled.end());
  EXPECT_EQ(choose_tiles_per_split(shuffled, kKvarnGrid), choose_tiles_per_split(ragged(8, 32768), kKvarnGrid));
  EXPECT_NE(choose_tiles_per_split(std::vector<int>{0, 0, 0, 255}, kKvarnGrid),
            choose_tiles_per_split(uniform(4, 255), kKvarnGrid));
}

TEST(DecodeSplitPlan, SplitsStayWithinTheTilesAndTheSplitBound) {
  for (int batch : {1, 8, 32, 128, 1024})
    for (int max_tiles : {1, 7, 63, 255, 1023})
      for (const DecodeGridShape& grid : {kKvarnGrid, kFp16Grid})
        for (const std::vector<int>& seq_tiles : {uniform(batch, max_tiles), ragged(batch, 128 * (max_tiles + 1))}) {
          const int per_split = choose_tiles_per_split(seq_tiles, grid);
          ASSERT_GE(per_split, 1);
          ASSERT_LE(per_split, max_tiles);
          EXPECT_LE(splits(max_tiles, per_split), std::max(16L, 8 * grid.slots / (static_cast<long>(batch) * kKvHeads)))
              << "batch " << batch << ", " << max_tiles << " tiles";
        }
}

TEST(DecodeSplitPlan, EmptyCachesGetOneTilePerSplit) {
  EXPECT_EQ(choose_tiles_per_split(uniform(8, 0), kKvarnGrid), 1);
  EXPECT_EQ(choose_tiles_per_split(uniform(1, 1), kFp16Grid), 1);
  EXPECT_EQ(choose_tiles_per_split({}, kKvarnGrid), 1);
}

}  // namespace
}  // namespace kvarn::cuda
