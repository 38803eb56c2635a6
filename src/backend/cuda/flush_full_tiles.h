#pragma once
// Flush: every full fp16 tail slot of a step becomes one tile in its new block, for every kv-head, in one launch.
// KVarN (and the rtn/rot ablations): variance normalization, RTN and packing as the CPU codec's
// TileCodec::encode_stored computes them, bit for bit (same operation order and roundings).
// fp16: the tail is copied into the block. The tail slot is left as it was: the caller empties it.
#include "backend/cuda/kv_layout.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace kvarn::cuda {

struct TileFlushJob {
  int32_t tail_slot = 0;
  int32_t block = 0;
};

// jobs: [num_jobs] on the device; each names a full tail slot and the block its tiles go to.
// The tail values must be finite: unlike the CPU codec, the kernel cannot refuse them (it does not check).
void flush_full_tiles(const KvCacheLayer& cache, const TileFlushJob* jobs, int num_jobs, cudaStream_t stream);

}  // namespace kvarn::cuda
