// choose_tiles_per_split: the split sizes that measured fastest on the H200 (132 SMs; 3 KVarN CTAs or 1 fp16 CTA
// of the D 128 kernels per SM) and the bounds every choice keeps; shared_bytes_to_spread: a grid of one wave spread
// over every SM; tails_in_tile_ctas: which grids go without tail CTAs. Host-only: runs without a GPU.
#include "backend/cuda/decode_split_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace kvarn::cuda {
namespace {

constexpr int kSms = 132, kKvHeads = 8;

constexpr DecodeGridShape kKvarnGrid{kKvHeads, 3L * kSms, 4, kSms}, kFp16Grid{kKvHeads, 1L * kSms, 1, kSms};

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

// Past a wave the model's own count asks for too few splits: batch 32 at up to 8K keeps the uniform batch's split
// grid, 3 x 24 (44.5 / 50.0 us), not 2 x 32 (48.3 / 55.9); at up to 32K it takes 5 x 52 (138.4 / 151.7) within the
// uniform batch's 3 x 88 (141.9 / 155.3). (The uniform batch at 8K takes one split, below; a ragged batch's longest
// sequences would set that grid's time.)
TEST(DecodeSplitPlan, SplitsARaggedBatchNoLongerThanItsLongestSequences) {
  EXPECT_EQ(choose_tiles_per_split(ragged(32, 8192), kKvarnGrid), 24);
  EXPECT_EQ(choose_tiles_per_split(ragged(32, 32768), kKvarnGrid), 52);
  for (int batch : {8, 32, 128})
    for (int context : {1024, 8192, 32768, 131072})
      for (const DecodeGridShape& grid : {kKvarnGrid, kFp16Grid})
        EXPECT_LE(choose_tiles_per_split(ragged(batch, context), grid),
                  choose_tiles_per_split(uniform(batch, context / 128 - 1), grid))
            << "batch " << batch << ", context " << context;
}

// Beyond four waves of the uniform plan (batch 128: 5-16) a ragged batch is planned as that uniform batch: at up to
// 128K its own count took 13 x 80, 0.95x the uniform 5 x 208 (Llama shape).
TEST(DecodeSplitPlan, PlansALargeRaggedBatchAsItsLongestSequences) {
  EXPECT_EQ(choose_tiles_per_split(ragged(128, 131072), kKvarnGrid), 208);
  EXPECT_EQ(choose_tiles_per_split(ragged(128, 8192), kFp16Grid), choose_tiles_per_split(uniform(128, 63), kFp16Grid));
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

// Batch 29-33 at 4K and 8K (31 and 63 tiles): one split, the tails read in the tile CTAs and no combine, where the
// model alone would take 3. H200 (Llama / Qwen shape, us): batch 32 at 4K 34.9 / 40.4 against 3 x 12's 39.4 / 46.5,
// at 8K 63.0 / 72.6 against 3 x 24's 66.8 / 75.1; batch 29 at 8K 62.7 / 71.6 against 64.7 / 72.1. Not at 32K (3 x 88;
// one split 0.98x / 0.97x), nor at batch 25, where half the SMs run 2 CTAs and half 1 (one split at 8K 0.95x / 0.97x),
// nor at 24, whose tail CTAs fit beside its tiles (one split 0.71x / 0.75x at 8K).
TEST(DecodeSplitPlan, TakesOneSplitWhereTheTailsFoldAndTheSmsShareItEvenly) {
  for (int batch : {29, 32, 33}) {
    EXPECT_EQ(choose_tiles_per_split(uniform(batch, 31), kKvarnGrid), 31) << "batch " << batch;
    EXPECT_EQ(choose_tiles_per_split(uniform(batch, 63), kKvarnGrid), 63) << "batch " << batch;
  }
  EXPECT_EQ(choose_tiles_per_split(uniform(32, 255), kKvarnGrid), 88);
  EXPECT_EQ(choose_tiles_per_split(uniform(25, 63), kKvarnGrid), 24);
  EXPECT_EQ(choose_tiles_per_split(uniform(24, 63), kKvarnGrid), 32);
  EXPECT_EQ(choose_tiles_per_split(uniform(40, 255), kKvarnGrid), 44);
}

// A grid whose tails cannot fold into its tile CTAs (a tile CTA serving a group of 16 that the tails serve in two
// blocks of 8) is planned with its tail CTAs and the combine, as the model times any other grid: at batch 29-33 x
// 8K the 3 splits of 24 that the model alone takes (above), not the one split of a fold.
TEST(DecodeSplitPlan, PlansTheTailCtasWhereTheTailsCannotFold) {
  DecodeGridShape grid = kKvarnGrid;
  grid.tails_fold = false;
  for (int batch : {29, 32, 33})
    EXPECT_EQ(choose_tiles_per_split(uniform(batch, 63), grid), 24) << "batch " << batch;
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

// Batch 32 x 1K, 1 split of 7 tiles: 256 pairs, 512 CTAs with the tail CTAs, one wave of 396 without, and no
// combine (Llama / Qwen shape 21.3 / 24.3 us with, 13.5 / 17.2 without). With more splits a pair's tail stays in a
// CTA of its own: at 8 x 8K (6 splits, 448 CTAs) the last split reading it ran 0.95x / 0.97x.
TEST(TailsInTileCtas, OnlyWhereEveryPairHasOneSplitAndTheTailsWouldFillAnotherWave) {
  const long slots = 3L * kSms;
  EXPECT_TRUE(tails_in_tile_ctas(1, 32 * kKvHeads, slots));
  EXPECT_TRUE(tails_in_tile_ctas(1, 128 * kKvHeads, slots));
  EXPECT_FALSE(tails_in_tile_ctas(6, 8 * kKvHeads, slots)) << "more than one split";
  EXPECT_FALSE(tails_in_tile_ctas(3, 32 * kKvHeads, slots)) << "more than one split";
  EXPECT_FALSE(tails_in_tile_ctas(1, slots / 2, slots)) << "the tail CTAs fit the wave";
  EXPECT_TRUE(tails_in_tile_ctas(1, slots / 2 + 1, slots));
  EXPECT_FALSE(tails_in_tile_ctas(0, 1000, slots)) << "no tiles: the tail CTAs are the grid";
}

// Hopper's shared memory (H100 and H200 alike): 228 KB per SM, 1 KB of it reserved per CTA, up to 227 KB per CTA;
// the A100's: 164 KB per SM, up to 163 KB per CTA. Both allocate in units of 128 bytes.
constexpr SmSharedMemory kHopperShared{233472, 1024, 232448, 128}, kA100Shared{167936, 1024, 166912, 128};
constexpr size_t kKvarnShared = 74 * 1024;  // about the KVarN kernel's, 3 CTAs per SM on Hopper

// The CTAs of `dynamic_bytes` each that an SM's shared memory holds at once, as the GPU allocates it.
long fitting(size_t dynamic_bytes, const SmSharedMemory& sm = kHopperShared) {
  const long used = static_cast<long>(dynamic_bytes) + sm.reserved_per_cta;
  return sm.per_sm / ((used + sm.allocation_unit - 1) / sm.allocation_unit * sm.allocation_unit);
}

// Batch 1 x 32K: 264 CTAs, 2 per SM, of a kernel that fits 3: once spread (113 KB each) only 2 fit on an SM;
// batch 1 x 1K, 24 CTAs: only 1.
TEST(SpreadGrid, LeavesRoomForOnlyTheCtasEachSmShouldRun) {
  const size_t bytes = shared_bytes_to_spread(264, kSms, 3, kKvarnShared, kHopperShared);
  EXPECT_EQ(fitting(bytes), 2) << bytes << " bytes";
  EXPECT_EQ(fitting(shared_bytes_to_spread(24, kSms, 3, kKvarnShared, kHopperShared)), 1);
}

TEST(SpreadGrid, AsksForWhatTheKernelNeedsWhereTheGridFillsTheSms) {
  for (const long ctas : {265L, 396L, 397L, 1000L})
    EXPECT_EQ(shared_bytes_to_spread(ctas, kSms, 3, kKvarnShared, kHopperShared), kKvarnShared) << ctas << " CTAs";
  EXPECT_EQ(shared_bytes_to_spread(100, kSms, 1, 150 * 1024, kHopperShared), 150u * 1024) << "a kernel of 1 per SM";
  EXPECT_EQ(shared_bytes_to_spread(0, kSms, 3, kKvarnShared, kHopperShared), kKvarnShared) << "an empty grid";
}

// Every grid up to a wave, of kernels that fit 2 to 8 CTAs per SM (by their shared memory or by their registers),
// on Hopper and on the A100 (108 SMs): never less than the kernel needs nor more than a CTA may have, and exactly
// ceil(ctas / SMs) per SM where that is fewer than the kernel fits, the allocation unit's rounding included (the
// A100 at 3 per SM: 164 KB / 3 is no whole number of units).
TEST(SpreadGrid, FitsCeilCtasOverSmsOnEverySm) {
  for (const auto& [sm, sms] : {std::pair{kHopperShared, kSms}, std::pair{kA100Shared, 108}})
    for (const int per_sm : {2, 3, 4, 5, 7, 8}) {
      const long share = sm.per_sm / per_sm / sm.allocation_unit * sm.allocation_unit;
      const size_t most = static_cast<size_t>(share - sm.reserved_per_cta);
      for (const size_t needed : {size_t{0}, size_t{16 * 1024} / per_sm, most})
        for (long ctas = 1; ctas <= per_sm * sms; ++ctas) {
          const size_t bytes = shared_bytes_to_spread(ctas, sms, per_sm, needed, sm);
          const long wanted = (ctas + sms - 1) / sms;
          ASSERT_GE(bytes, needed);
          ASSERT_LE(bytes, static_cast<size_t>(sm.max_per_cta));
          if (wanted < per_sm)
            ASSERT_EQ(std::min<long>(fitting(bytes, sm), per_sm), wanted)
                << sm.per_sm << " bytes per SM, " << ctas << " CTAs, " << needed << " bytes needed";
          else
            ASSERT_EQ(bytes, needed) << ctas << " CTAs";
        }
    }
}

// The 2-CTA twin of the KVarN kernel (launch_kernel) at 165 registers would fit 3 per SM: it asks for the fewest
// bytes that keep it at 2 (77 KB on Hopper, leaving ~75 KB to other kernels' CTAs), never less than it needs.
TEST(CappedCtas, AskForTheFewestBytesThatKeepOneMoreOff) {
  for (const auto& sm : {kHopperShared, kA100Shared})
    for (const int per_sm : {1, 2, 3, 4}) {
      const size_t bytes = shared_bytes_to_cap(per_sm, 16 * 1024, sm);
      EXPECT_EQ(fitting(bytes, sm), per_sm) << sm.per_sm << " bytes per SM, " << per_sm << " CTAs";
      EXPECT_GT(fitting(bytes - sm.allocation_unit, sm), per_sm) << "one unit less lets one more on";
    }
  EXPECT_EQ(shared_bytes_to_cap(2, kKvarnShared, kHopperShared), 609u * 128 - 1024);
  EXPECT_EQ(shared_bytes_to_cap(2, 100 * 1024, kHopperShared), 100u * 1024) << "what it needs, where that is more";
}

}  // namespace
}  // namespace kvarn::cuda
