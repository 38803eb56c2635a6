#pragma once
// Decode attention: one query token per sequence over its full tiles (read packed, dequantized in registers)
// plus its fp16 tail. Grouped-query aware: the q heads sharing a kv-head are served from one read of a tile (up to
// 16 of them over code tiles, 8 over fp16 tiles; where a second read finishes sooner, a group past 8 heads in a
// small grid per block of up to 8, and a group of 8 over code tiles in a tiny grid per half:
// DecodeAttentionPlan::tile_heads). Split-K over tiles, then a reduction kernel that
// combines the partial softmax states and rotates the output back to the model's space (where a pair's tiles are
// one CTA's and the grid is large, that CTA reads the tail too and writes the output: no reduction kernel).
#include "backend/cuda/kv_layout.h"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvarn::cuda {

struct DecodeAttentionArgs {
  const uint16_t* q = nullptr;             // [num_seqs][num_q_heads][D] fp16, post-RoPE, model space, 16-byte aligned
  uint16_t* out = nullptr;                 // [num_seqs][num_q_heads][D] fp16, model space, 16-byte aligned
  const SequenceKvView* seqs = nullptr;    // [num_seqs], device
  const int32_t* block_tables = nullptr;   // device; indexed through SequenceKvView::block_table_offset
  int num_seqs = 0;
  int num_q_heads = 0;                     // a positive multiple of num_kv_heads
  float scale = 0;                         // softmax scale, finite and > 0: 1/sqrt(D) for the Llama family
  // Start reading the tiles while the kernel before this call in the stream is still running (Hopper's
  // programmatic dependent launch; a decode step's attention follows the kernel that appends its K/V and writes
  // q: append_to_tails lets it start at once). That kernel may write q and the tails, which are read after it has
  // finished; it must not write the cache's blocks, the block tables or `seqs` (a flush of full tails must come
  // earlier), and if it is itself a programmatic dependent it must release this call only after its own wait, so
  // that no kernel before it is still running (decode_attention's combine does so; a call without one releases the
  // next as its attention starts, as safely: it writes no tiles, and the kernel it overlaps released it late).
  bool overlap_previous_kernel = false;
};

// How the work is split, for the sequences and q heads it was made for; the workspace holds the partial softmax
// states.
struct DecodeAttentionPlan {
  int num_seqs = 0, num_q_heads = 0;
  int tile_heads = 1;  // q heads of a kv head's group that one read of a tile serves
  int tiles_per_split = 1;
  int num_splits = 0;  // over tiles; one more partial per sequence holds its tail
  size_t workspace_bytes = 0;
};

// seq_tiles: every sequence's full tiles, as the scheduler knows them on the host (one plan per step serves every
// layer). tiles_per_split: 0 for the split planner's choice (decode_split_plan.h); a positive value fixes it (the
// benchmark's --tiles-per-split, which times the planner's alternatives). tile_heads: 0 for the planner's choice; a
// positive value fixes it: over code tiles, for groups past 8 the group's largest divisor of at most 16 or of at
// most 8, for groups of 5-8 that split in two halves of up to 4 the whole group or a half (the tests and the
// benchmark's --tile-heads time each).
DecodeAttentionPlan plan_decode_attention(const KvCacheLayer& cache, std::span<const int> seq_tiles, int num_q_heads,
                                          int tiles_per_split = 0, int tile_heads = 0);

// plan: made for these sequences. A sequence with more full tiles than the plan's splits cover (a plan kept from an
// earlier step) still gets its attention: the last split reads the tiles past the plan's, in a longer CTA.
// workspace: plan.workspace_bytes of device memory, 16-byte aligned. One or two launches on `stream`: the attention,
// then the combine of the partials unless each pair's CTA wrote its output (tails_in_tile_ctas). `stream` must
// belong to the current device (the kernels' attributes are read per current device, per_device.h). A sequence
// with no tokens gets zeros. Throws kvarn::Error for unsupported shapes, a bad cache (check_kv_cache_layer), a
// non-positive scale and null or misaligned arrays.
void decode_attention(const KvCacheLayer& cache, const DecodeAttentionArgs& args, const DecodeAttentionPlan& plan,
                      void* workspace, cudaStream_t stream);

}  // namespace kvarn::cuda
