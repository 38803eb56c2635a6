#pragma once
// The code tiles of a prefill step's cached prefixes, decoded once into fp16 tiles that prefill attention reads
// like an fp16 cache's. Every q head and every 128-row query block of a chunk reads the whole prefix: decoded
// inside the attention kernel, each tile was decoded group x chunk/128 times (2048 rows of Llama-3-8B: 64 times)
// and the attention over a 30K-token KVarN prefix ran at 0.69x of its speed over fp16 tiles. Decoded once, a tile
// costs a read of its packed bytes and a write of 4 G D bytes: over a 30K-token prefix the call is ~2% slower than
// the same attention over fp16 tiles, besides the chunk's rotation (H200, docs/benchmarks.md).
#include "backend/cuda/kv_layout.h"
#include "backend/cuda/prefill_attention.h"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvarn::cuda {

// Bytes of the fp16 tiles of num_prefix_tiles code tiles in every kv head: [num_prefix_tiles][num_kv_heads]
// [K [G][D], V [G][D]], fp16, storage space (codec::TileLayout::plain(D, G, 16) per tile). Throws kvarn::Error for a
// negative count.
size_t dequantized_prefix_bytes(const KvCacheLayer& cache, int num_prefix_tiles);

// One launch on `stream`: tile i of sequence s in every kv head, decoded as codec::TileCodec::decode decodes it
// (each element computed in fp32 and rounded once to fp16), into slot seqs[s].prefix_tile_begin + i of `out`.
// The sequences' tiles fill the slots in order: prefix_tile_begin of sequence s is the sum of prefix.num_tiles
// over the sequences before it, and num_prefix_tiles the sum over all (slots past the last sequence's tiles are
// left as they were, not read from beyond its block table). `cache` must hold code tiles; `out` is 16-byte aligned.
// Throws kvarn::Error for a bad cache (check_kv_cache_layer), negative counts and null or misaligned arrays.
void dequantize_prefix_tiles(const KvCacheLayer& cache, const PrefillSequence* seqs, int num_seqs,
                             const int32_t* block_tables, int num_prefix_tiles, uint8_t* out, cudaStream_t stream);

}  // namespace kvarn::cuda
