#pragma once
// Flush: every full fp16 tail slot of a step becomes one tile in its new block, for every kv-head of every layer, in
// one launch (per 128 layers): a tile's encoding is a serial chain of ~16 normalization passes, so a launch per layer
// would cost a step that chain's latency once per layer (H200: one job 43 us, 32 jobs in one launch 101 us).
// KVarN (and the rtn/rot ablations): variance normalization, RTN and packing as the CPU codec's
// TileCodec::encode_stored computes them, bit for bit (same operation order and roundings).
// fp16: the tail is copied into the block. The tail slot is left as it was: the caller empties it.
#include "backend/cuda/kv_layout.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

namespace kvarn::cuda {

struct TileFlushJob {
  int32_t tail_slot = 0;
  int32_t block = 0;
};

// layers: a cache's layers (one format); jobs: [num_jobs] on the device, each names a full tail slot and the block
// its tiles go to, in every layer (a block id names the same block in every layer's pool, DESIGN.md).
// The tail values must be finite: unlike the CPU codec, the kernel cannot refuse them (it does not check).
void flush_full_tiles(std::span<const KvCacheLayer> layers, const TileFlushJob* jobs, int num_jobs,
                      cudaStream_t stream);

// One layer's.
inline void flush_full_tiles(const KvCacheLayer& layer, const TileFlushJob* jobs, int num_jobs, cudaStream_t stream) {
  flush_full_tiles(std::span(&layer, 1), jobs, num_jobs, stream);
}

}  // namespace kvarn::cuda
