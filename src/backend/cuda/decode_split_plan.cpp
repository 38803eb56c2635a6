#include "backend/cuda/decode_split_plan.h"

#include <algorithm>

namespace kvarn::cuda {

namespace {

// Measured on the H200 (k4v2_g128 unless said, Llama / Qwen shape, µs per call, each pair in one run): batch
// 8 x 32K, 6 x 43 tiles (pair-major order) 71.1 / 78.1, 6 x 44 split-major (the last split 35) 68.5 / 74.9;
// 8 x 8K 4 x 16: 27.8 / 33.6, 6 x 12: 25.9 / 31.1. A tail CTA, read on tensor cores like one fp16 tile, counts as
// one tile: fp16 at batch 8 x 1K 2 x 4 15.2 / 16.2 us, 2 x 6 (a tail counted as 4 tiles) 15.9 / 16.9; 1 x 8K 16 x 4
// and 13 x 5 equal (16.4 / 17.4); the KVarN choices on the benchmark's grid are the same for weights 1 to 4. (With
// the former fp32 tail, 4 was right: 16 x 4 took 22.1 us at 1 x 8K against 17.8 for 13 x 5.) Earlier: leaving the
// tail CTAs out chose 6 splits at 8 x 8K (33.0 us; 4 splits 27.0); a throughput bound (tiles of the busiest SM)
// chose 33 splits at 8 x 128K (240.3 us against 226.1 with 6); on the H100 the older rule, "two waves", ran up to
// 1.12x slower.
constexpr double kCtaOverheadRounds = 2.0, kTailTiles = 1.0;

// The slots the `pairs` tail CTAs take first: the tile CTAs in slots [early, slots) start when the tails are done.
struct TailSlots {
  long slots, early;
  double tails_done;

  TailSlots(long pairs, long slots_, double tail_time)
      : slots(slots_), early(slots_ - std::min(pairs, slots_)),
        tails_done(tail_time * static_cast<double>((pairs + slots_ - 1) / slots_)) {}
};

// When the grid's last CTA finishes, in rounds: `slots` CTAs run at once; tile CTAs beyond the slots free at the
// start wait for the tails; every tile CTA takes cta_time. (A CTA's pace is set by its own instruction latencies
// more than by memory, so the CTAs of a thin last round run only a little faster: they are counted whole.)
double grid_time(long tile_ctas, const TailSlots& t, double cta_time) {
  const bool tails = t.early < t.slots;
  const long rounds = tile_ctas / t.slots, rest = tile_ctas % t.slots;
  const double last_round_start = static_cast<double>(rounds) * cta_time;
  if (rest == 0) return tails ? t.tails_done + last_round_start : last_round_start;
  if (rest <= t.early)
    return std::max(last_round_start + cta_time, rounds > 0 && tails ? t.tails_done + last_round_start : 0.0);
  return t.tails_done + last_round_start + cta_time;
}

// When tile CTA number `index` (in launch order) starts, in the units of grid_time, the CTAs before it taking
// cta_time: its round's start, and the tails' time if it waits for a slot a tail CTA held.
double start_of(long index, const TailSlots& t, double cta_time) {
  return static_cast<double>(index / t.slots) * cta_time + (index % t.slots >= t.early ? t.tails_done : 0.0);
}

}  // namespace

int choose_tiles_per_split(int max_tiles, const DecodeGridShape& grid) {
  const long tiles = std::max(1, max_tiles), pairs = std::max(1L, grid.pairs), slots = std::max(1L, grid.slots);
  const int at_once = std::max(1, grid.tiles_at_once);
  const TailSlots tail_slots(pairs, slots, kTailTiles / at_once);
  const long most_splits = std::min(tiles, std::max(16L, 8 * slots / pairs));
  auto cta_time = [&](long n) { return static_cast<double>((n + at_once - 1) / at_once) + kCtaOverheadRounds; };
  long chosen = tiles;
  double best = -1;
  for (long per_split = tiles; per_split >= 1; --per_split) {
    const long used = (tiles + per_split - 1) / per_split;
    if (used > most_splits) break;
    const double full = cta_time(per_split), last = cta_time(tiles - (used - 1) * per_split);
    const double cost = std::max(used > 1 ? grid_time(pairs * (used - 1), tail_slots, full) : 0.0,
                                 start_of(pairs * used - 1, tail_slots, full) + last);
    if (best < 0 || cost < best) best = cost, chosen = per_split;
  }
  return static_cast<int>(chosen);
}

}  // namespace kvarn::cuda
