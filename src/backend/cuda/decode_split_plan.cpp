#include "backend/cuda/decode_split_plan.h"

#include <algorithm>
#include <map>

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

// A ragged batch is planned from its own sequences' CTAs where the uniform batch of its longest sequence would take
// at most this many waves, and never with longer splits than that uniform batch's; beyond, as that uniform batch.
// Measured on the H200 (sequences at every length up to the row's context, section "Decode: ragged batches" of
// docs/benchmarks.md), against the uniform plan: k4v2 batch 8 x 8K / 32K / 128K 8 / 28 / 104 tiles per split
// instead of 12 / 44 / 172, 1.19-1.42x; 32 x 1K / 32K / 128K 1.02-1.11x; fp16 batch 8 and 32 1.03-1.31x. Past a wave
// the rounds model, whose CTAs' times are their tiles and whose waves do not share the bandwidth, asks for too few
// splits: k4v2 32 x 8K 32 tiles instead of 24 (0.89-0.92x; hence the bound), and at batch 128 (5-16 waves) Llama
// 128 x 128K 80 instead of 208 (0.95x), fp16 128 x 8K 11 instead of 63 (0.97-0.99x) (hence the waves).
constexpr long kRaggedWaves = 4;

// A uniform batch's grid of one split per pair that goes without tail CTAs (tails_in_tile_ctas), fits a wave and
// gives at least 3 in 4 SMs its most CTAs (folds_evenly) is timed as its CTA's tiles and tail less this many rounds:
// the combine it does without and what the model misses of split grids (their waves share the bandwidth). Measured
// on the H200, k4v2, Llama / Qwen shape, one split against the model's 3 (its rounds): batch 32 at 4K 1.13x / 1.15x
// (10.25 against 10), 8K 1.06x / 1.04x (18.25 / 16), 16K 1.02x / 1.00x (34.25 / 26), 32K 0.98x / 0.97x (66.25 /
// 48); batch 29 (3 in 4 SMs with 2 CTAs) 1.08x / 1.10x at 4K, 1.03x / 1.01x at 8K; 33 (all) 1.14x / 1.15x, 1.06x /
// 1.05x. Where fewer SMs hold the most CTAs, those set the grid's time: batch 25 (half the SMs with 2) 1.00x / 1.02x
// at 4K, 0.95x / 0.97x at 8K; 40 and 41 at 32K (2 or 3 per SM) 0.95x. At batch 24 the tail CTAs fit beside the
// tiles (no fold) and one split ran 0.68-0.88x at 4K-16K.
constexpr double kFoldedOneSplitRounds = 2.5;

bool folds_evenly(long pairs, long slots, long sms) {
  const long most = (pairs + sms - 1) / sms;
  return pairs <= slots && tails_in_tile_ctas(1, pairs, slots) && 4 * (pairs - (most - 1) * sms) >= 3 * sms;
}

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

// The split size whose grid finishes first, for kv_heads pairs per sequence of each length (tiles -> sequences).
// Every CTA of a split counts as a full one (a short sequence's one CTA too); the last split's CTAs, the longest
// sequences', are timed apart. With `fold`, the grid of one split as kFoldedOneSplitRounds says.
int fastest_split(const std::map<int, long>& sequences_of_length, long kv_heads, long pairs, long slots, int at_once,
                  bool fold) {
  const long tiles = std::max(1, sequences_of_length.empty() ? 0 : sequences_of_length.rbegin()->first);
  const TailSlots tail_slots(pairs, slots, kTailTiles / at_once);
  const long most_splits = std::min(tiles, std::max(16L, 8 * slots / pairs));
  auto cta_time = [&](long n) { return static_cast<double>((n + at_once - 1) / at_once) + kCtaOverheadRounds; };
  long chosen = tiles;
  double best = -1;
  for (long per_split = tiles; per_split >= 1; --per_split) {
    const long used = (tiles + per_split - 1) / per_split;
    if (used > most_splits) break;
    long ctas = 0, last_split_ctas = 0;
    for (const auto& [length, count] : sequences_of_length) {
      const long splits = (length + per_split - 1) / per_split;
      ctas += splits * count * kv_heads;
      if (splits == used) last_split_ctas += count * kv_heads;
    }
    const double full = cta_time(per_split), last = cta_time(tiles - (used - 1) * per_split);
    const bool folded = fold && used == 1;
    const double cost =
        folded ? full + kTailTiles / at_once - kFoldedOneSplitRounds
               : std::max(ctas > last_split_ctas ? grid_time(ctas - last_split_ctas, tail_slots, full) : 0.0,
                          start_of(std::max(ctas, 1L) - 1, tail_slots, full) + last);
    if (best < 0 || cost < best) best = cost, chosen = per_split;
  }
  return static_cast<int>(chosen);
}

}  // namespace

int choose_tiles_per_split(std::span<const int> seq_tiles, const DecodeGridShape& grid) {
  std::map<int, long> sequences_of_length;
  for (int t : seq_tiles) ++sequences_of_length[std::max(t, 0)];
  const long kv_heads = std::max(1, grid.kv_heads), slots = std::max(1L, grid.slots);
  const long seqs = std::max(1L, static_cast<long>(seq_tiles.size())), pairs = seqs * kv_heads;
  const int at_once = std::max(1, grid.tiles_at_once);
  const int longest = sequences_of_length.empty() ? 0 : sequences_of_length.rbegin()->first;
  if (sequences_of_length.size() <= 1)
    return fastest_split({{longest, seqs}}, kv_heads, pairs, slots, at_once,
                         grid.tails_fold && folds_evenly(pairs, slots, std::max(1, grid.sms)));
  const int uniform = fastest_split({{longest, seqs}}, kv_heads, pairs, slots, at_once, false);
  const long uniform_ctas = pairs * ((std::max(longest, 1) + uniform - 1) / uniform + 1);
  if (uniform_ctas > kRaggedWaves * slots) return uniform;
  return std::min(uniform, fastest_split(sequences_of_length, kv_heads, pairs, slots, at_once, false));
}

bool tails_in_tile_ctas(int num_splits, long pairs, long slots) { return num_splits == 1 && 2 * pairs > slots; }

size_t shared_bytes_to_spread(long ctas, int sms, int ctas_per_sm, size_t needed, const SmSharedMemory& shared) {
  const long sm_count = std::max(sms, 1), per_sm = (ctas + sm_count - 1) / sm_count;
  if (per_sm < 1 || per_sm >= ctas_per_sm) return needed;
  // A whole number of allocation units per CTA, reserved memory included: per_sm of them fit, per_sm + 1 do not.
  const long unit = std::max(shared.allocation_unit, 1L);
  const long spread = shared.per_sm / per_sm / unit * unit - shared.reserved_per_cta;
  return static_cast<size_t>(std::max(static_cast<long>(needed), std::min(spread, shared.max_per_cta)));
}

size_t shared_bytes_to_cap(int ctas_per_sm, size_t needed, const SmSharedMemory& shared) {
  const long unit = std::max(shared.allocation_unit, 1L);
  const long more = std::max(ctas_per_sm, 1) + 1L;  // this many must not fit: each takes more than per_sm / more
  const long cap = (shared.per_sm / more / unit + 1) * unit - shared.reserved_per_cta;
  return static_cast<size_t>(std::max(static_cast<long>(needed), std::min(cap, shared.max_per_cta)));
}

}  // namespace kvarn::cuda
