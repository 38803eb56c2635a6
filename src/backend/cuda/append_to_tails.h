#pragma once
// Append: a step's new post-RoPE key/value rows into their sequences' fp16 tail slots, Hadamard-rotated for
// rotated cache dtypes (the tail is stored in the space the tiles are stored in).
#include "backend/cuda/kv_layout.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace kvarn::cuda {

// Where one new token row goes: tail slot and position in it (0..G-1).
struct TailAppendRow {
  int32_t tail_slot = 0;
  int32_t position = 0;
};

// k, v: [num_rows][num_kv_heads][D] fp16 on the device, 16-byte aligned; rows: [num_rows] on the device. One launch.
// Throws kvarn::Error for a bad cache (check_kv_cache_layer), a negative count and null or misaligned arrays.
void append_to_tails(const KvCacheLayer& cache, const uint16_t* k, const uint16_t* v, const TailAppendRow* rows,
                     int num_rows, cudaStream_t stream);

}  // namespace kvarn::cuda
