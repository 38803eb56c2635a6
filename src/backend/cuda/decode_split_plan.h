#pragma once
// How decode attention lays out its grid: how it splits each (sequence, kv-head) pair's tiles over CTAs (split-K),
// the split size that finishes the grid soonest under a model of its launch, and how it spreads a grid of one wave
// over the SMs. Host-only, so that it is tested without a GPU.
//
// The grid (decode_attention.cu): a tail CTA per (sequence, kv-head) pair first, then the tile CTAs split-major
// (split s of every pair before split s + 1), `slots` CTAs resident at once. A tile CTA takes ceil(tiles /
// tiles_at_once) rounds plus ~2 rounds of start (queries, the first tile's latency) and merge; a tail CTA about as
// long as 4 tiles (one KVarN round, 4 fp16 rounds) and tile CTAs beyond the slots the tails hold start that much
// later.
#include <cstddef>
#include <span>

namespace kvarn::cuda {

struct DecodeGridShape {
  int kv_heads = 1;       // pairs per sequence
  long slots = 1;         // CTAs resident at once: SMs x CTAs per SM
  int tiles_at_once = 1;  // tiles a CTA reads at once: 4 for KVarN (a tile per warp), 1 for fp16
  int sms = 1;            // multiprocessors, slots / sms CTAs each
  // Whether a grid of one split per pair may go without tail CTAs (tails_in_tile_ctas): not where a tile CTA serves
  // a group that the tails serve in several blocks (decode_attention.cu).
  bool tails_fold = true;
};

// Tiles per split (>= 1) for sequences of seq_tiles full tiles each. Every split size is tried, not only the
// longest sequence's tiles divided by a number of splits and rounded up: the last split, the shortest and launched
// last, is timed apart, so that a last split shorter by about a tail's time lets the CTAs that start after the
// tails finish with the others. The CTAs are counted sequence by sequence: in a ragged batch (continuous batching
// holds sequences of every length) the short ones take few, and the longest ones' splits finish the grid; no
// longer than in the uniform batch of the longest sequence, and as that batch where its plan takes more than four
// waves (the model's CTA times hold at one wave, not where waves share the bandwidth; measured in
// decode_split_plan.cpp). A uniform batch whose one split per pair would go without tail CTAs (where they may fold)
// in one wave spread evenly over the SMs gets that grid's time with the combine it saves (batch 29-33 at 4K-8K: one
// split, 1.01-1.15x).
int choose_tiles_per_split(std::span<const int> seq_tiles, const DecodeGridShape& grid);

// Whether a grid of `num_splits` tile CTAs per pair goes without tail CTAs, each pair's one CTA reading its tail
// after its tiles and writing the output (no combine kernel): only where every pair has one split and the tail CTAs
// would make the grid larger than `slots`. Measured on the H200 (docs/benchmarks.md, Llama / Qwen shape): k4v2
// 32 x 1K 1.58x / 1.41x (512 CTAs to 256: one wave, and no combine), 128 x 1K 1.07x / 1.11x, fp16 32 x 1K 1.09x /
// 1.08x, 1 split at 8K and 32K 1.00-1.03x. With more splits the tail lengthened the last split's CTA instead (the
// combine still needed): 8 x 8K 0.95x / 0.97x, 32 x 8K 0.96x / 0.97x, 8 x 32K 0.96x / 0.99x.
bool tails_in_tile_ctas(int num_splits, long pairs, long slots);

// An SM's shared memory as the GPU shares it out among CTAs (the cudaDevAttr...SharedMemory... attributes).
struct SmSharedMemory {
  long per_sm = 0;            // shared out among the CTAs of an SM
  long reserved_per_cta = 0;  // taken from it by the system for each CTA
  long max_per_cta = 0;       // the most dynamic shared memory a kernel may opt in to
  // A CTA's shared memory (reserved, static and dynamic) is allocated in whole units of this (cuda_occupancy.h: 128
  // bytes from compute capability 8.0 on, 256 before).
  long allocation_unit = 128;
};

// The dynamic shared memory a launch of `ctas` CTAs asks for, each needing `needed` bytes, on `sms` SMs that hold
// `ctas_per_sm` of them at once. A grid that fits at fewer CTAs per SM asks for so much that only ceil(ctas / sms)
// fit on an SM, so that every SM gets its share wherever the GPU places them; any other asks for `needed`. Why and
// what it gains: decode_attention.cu, launch_shared_bytes.
size_t shared_bytes_to_spread(long ctas, int sms, int ctas_per_sm, size_t needed, const SmSharedMemory& shared);

// The fewest bytes, at least `needed`, that a CTA asks for so that no more than `ctas_per_sm` of them fit on an SM:
// a kernel whose registers would let more on holds to its bound and leaves the rest to other kernels' CTAs.
size_t shared_bytes_to_cap(int ctas_per_sm, size_t needed, const SmSharedMemory& shared);

}  // namespace kvarn::cuda
