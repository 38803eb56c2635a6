#pragma once
// Prefill attention: a chunk of new query tokens per sequence, causal within the chunk, over the sequence's cached
// history (full tiles, code tiles decoded once into fp16 tiles in the workspace, plus the fp16 tail) and the
// chunk's own fp16 K/V.
// On tensor cores (mma m16n8k16, fp32 accumulate), FlashAttention-style online softmax; the output is rotated
// back to the model's space. The chunk's K/V are not written to the cache here: appending them to the tails and
// flushing full tails is append_to_tails / flush_full_tiles' job, after this call.
#include "backend/cuda/kv_layout.h"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvarn::cuda {

// One sequence of a prefill step: its cached history (tiles and tail, read-only here) and the rows of its chunk
// in q/k/v/out. Chunk row i sits at position prefix + i and attends to the whole prefix and chunk rows 0..i.
struct PrefillSequence {
  SequenceKvView prefix;
  int32_t chunk_begin = 0;  // first row of the chunk in q/k/v/out
  int32_t chunk_len = 0;
  int32_t prefix_tile_begin = 0;  // the sum of prefix.num_tiles over the sequences before this one
};

struct PrefillAttentionArgs {
  // q, k, v, out: device memory, 16-byte aligned.
  const uint16_t* q = nullptr;           // [num_rows][num_q_heads][D] fp16, post-RoPE, model space
  const uint16_t* k = nullptr;           // [num_rows][num_kv_heads][D] fp16, post-RoPE, model space
  const uint16_t* v = nullptr;           // [num_rows][num_kv_heads][D] fp16, model space
  uint16_t* out = nullptr;               // [num_rows][num_q_heads][D] fp16, model space
  const PrefillSequence* seqs = nullptr; // [num_seqs], device
  const int32_t* block_tables = nullptr; // device; indexed through prefix.block_table_offset
  int num_seqs = 0;
  int num_rows = 0;                      // rows of q/k/v/out, the sum of the chunk lengths
  int num_q_heads = 0;                   // a positive multiple of num_kv_heads
  int max_chunk_len = 0;                 // >= every sequence's chunk_len
  float scale = 0;                       // softmax scale, finite and > 0: 1/sqrt(D) for the Llama family
  // The sum of prefix.num_tiles over the sequences: the workspace's decoded tiles, which the kernel reads at
  // prefix_tile_begin + i unchecked (a check in each CTA cost 1.5% over a 30K-token prefix: docs/benchmarks.md).
  // No default: a count left unset is refused (at 0 the kernel would read past the workspace).
  int num_prefix_tiles = -1;
};

// Device memory prefill_attention needs beside its arguments: the chunk's K/V rotated into the storage space
// (rotated cache dtypes) and the prefix's code tiles decoded to fp16 (code-tile caches: 4 G D bytes per tile and
// kv head, 128 KB per 128 tokens of Llama-3-8B's 8 kv heads, 126 MB for a 30K-token prefix).
// Throws kvarn::Error for negative counts.
size_t prefill_attention_workspace_bytes(const KvCacheLayer& cache, int num_rows, int num_prefix_tiles);

// workspace: prefill_attention_workspace_bytes of device memory, 16-byte aligned (null where that is 0). Up to three
// launches on `stream` (rotate the chunk's K/V, decode the prefix's code tiles, attend); `stream` must belong to
// the current device (the kernel's shared memory opt-in is set per current device, per_device.h). Throws
// kvarn::Error for unsupported shapes, a bad cache (check_kv_cache_layer), a non-positive scale and null or
// misaligned arrays.
void prefill_attention(const KvCacheLayer& cache, const PrefillAttentionArgs& args, void* workspace,
                       cudaStream_t stream);

}  // namespace kvarn::cuda
