// Shape contract: k, v [num_rows][H][D] fp16 -> tails[slot][K|V][H][position][D] fp16.
// One warp per (row, kv-head, K|V): D/32 elements per lane, rotated in registers by warp shuffles.
// Bytes: reads and writes 2*H*D*2 bytes per row; no arithmetic worth counting (D log D adds per vector).
// Every CTA releases the kernel after it at its start: a step's attention, launched to overlap this kernel
// (DecodeAttentionArgs::overlap_previous_kernel), then reads its tiles while the rows are appended, and the tails
// only after this kernel's end. Not a programmatic dependent itself, this kernel starts after every kernel before
// it has ended, so the attention never runs beside one that writes tiles (a flush).
#include "backend/cuda/append_to_tails.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hadamard_warp.cuh"
#include "backend/cuda/programmatic_launch.cuh"

#include <cuda_fp16.h>

namespace kvarn::cuda {

namespace {

template <int D>
__global__ void append_to_tails_kernel(const __half* __restrict__ k, const __half* __restrict__ v,
                                       const TailAppendRow* __restrict__ rows, int num_rows, int num_kv_heads,
                                       int tile_tokens, bool rotate, __half* __restrict__ tails) {
  constexpr int E = D / 32;
  release_next_kernel();
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const int head = warp % num_kv_heads;
  const int which = (warp / num_kv_heads) % 2;  // 0: key, 1: value
  const int row = warp / (2 * num_kv_heads);
  if (row >= num_rows) return;
  const __half* src = (which == 0 ? k : v) + (static_cast<size_t>(row) * num_kv_heads + head) * D + lane * E;
  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = __half2float(src[i]);
  if (rotate) hadamard_warp<D>(x);
  const TailAppendRow target = rows[row];
  __half* dst = tails + ((static_cast<size_t>(target.tail_slot) * 2 + which) * num_kv_heads + head) *
                            static_cast<size_t>(tile_tokens) * D +
                static_cast<size_t>(target.position) * D + lane * E;
#pragma unroll
  for (int i = 0; i < E; ++i) dst[i] = __float2half_rn(x[i]);
}

}  // namespace

void append_to_tails(const KvCacheLayer& cache, const uint16_t* k, const uint16_t* v, const TailAppendRow* rows,
                     int num_rows, cudaStream_t stream) {
  check_kv_cache_layer(cache, "append_to_tails");
  if (num_rows < 0) throw_error("append_to_tails: num_rows " + std::to_string(num_rows) + "; expected >= 0");
  if (num_rows == 0) return;
  check_device_memory(k, 16, "append_to_tails", "k", "[num_rows][num_kv_heads][D] fp16");
  check_device_memory(v, 16, "append_to_tails", "v", "[num_rows][num_kv_heads][D] fp16");
  check_device_memory(rows, alignof(TailAppendRow), "append_to_tails", "rows", "[num_rows] TailAppendRow");
  check_device_memory(cache.tails, 16, "append_to_tails", "cache.tails", "[num_slots][2][num_kv_heads][G][D] fp16");
  constexpr int kThreads = 256;
  const long warps = static_cast<long>(num_rows) * 2 * cache.num_kv_heads;
  const int blocks = static_cast<int>((warps * 32 + kThreads - 1) / kThreads);
  const auto* kh = reinterpret_cast<const __half*>(k);
  const auto* vh = reinterpret_cast<const __half*>(v);
  auto* tails = reinterpret_cast<__half*>(cache.tails);
  if (cache.head_dim() == 128)
    append_to_tails_kernel<128><<<blocks, kThreads, 0, stream>>>(kh, vh, rows, num_rows, cache.num_kv_heads,
                                                                 cache.tile_tokens(), cache.rotated(), tails);
  else
    append_to_tails_kernel<64><<<blocks, kThreads, 0, stream>>>(kh, vh, rows, num_rows, cache.num_kv_heads,
                                                                cache.tile_tokens(), cache.rotated(), tails);
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda
