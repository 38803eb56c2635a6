#pragma once
// How decode attention splits each (sequence, kv-head) pair's tiles over CTAs (split-K): the split size that
// finishes the grid soonest under a model of its launch. Host-only, so that it is tested without a GPU.
//
// The grid (decode_attention.cu): `pairs` tail CTAs first, then the tile CTAs split-major (split s of every pair
// before split s + 1), `slots` CTAs resident at once. A tile CTA takes ceil(tiles / tiles_at_once) rounds plus
// ~2 rounds of start (queries, the first tile's latency) and merge; a tail CTA about as long as 4 tiles (one
// KVarN round, 4 fp16 rounds) and tile CTAs beyond the slots the tails hold start that much later.
namespace kvarn::cuda {

struct DecodeGridShape {
  long pairs = 1;         // sequences x kv-heads
  long slots = 1;         // CTAs resident at once: SMs x CTAs per SM
  int tiles_at_once = 1;  // tiles a CTA reads at once: 4 for KVarN (a tile per warp), 1 for fp16
};

// Tiles per split for sequences of at most max_tiles tiles (>= 1). Every split size is tried, not only max_tiles
// divided by a number of splits and rounded up: the last split, the shortest and launched last, is timed apart,
// so that a last split shorter by about a tail's time lets the CTAs that start after the tails finish with the
// others.
int choose_tiles_per_split(int max_tiles, const DecodeGridShape& grid);

}  // namespace kvarn::cuda
