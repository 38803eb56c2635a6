// Shape contract: tails[slot][K|V][H][G][D] fp16 -> blocks[block][H][layout.bytes] (codec/tile_layout.h).
// KVarN: one CTA of 128 threads per (job, kv-head, K|V): the matrix (keys D x G, channel-major; values G x D)
// sits in shared memory as it came, fp16 (R x (C+2), padded so that both row-per-thread and column-per-thread
// walks are free of bank conflicts; 6 CTAs per SM). Sums run one thread per row or column in the CPU's order,
// without FMA contraction, and exp/log go through double and round once, as glibc's expf/logf do: the result
// matches the CPU codec bit for bit except where glibc and the device's double exp/log round differently (a rare
// ulp), which can move a code across a rounding boundary or, rarer, the choice of the best normalization iterate.
// Cost: reads 2*G*D*2 bytes and writes layout.bytes per kv-head; ~16 iterations x 3 two-pass statistics over
// R*C elements, ~90K instructions per warp, latency-bound (serial sums), ~130 us per CTA (H200); many CTAs run
// side by side.
#include "backend/cuda/flush_full_tiles.h"

#include "backend/cuda/cuda_check.h"

#include <cuda_fp16.h>

#include <cfloat>

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kIterations = 16;  // codec::kNormalizationIterations

__device__ __forceinline__ float exp_as_glibc(float x) { return static_cast<float>(exp(static_cast<double>(x))); }
__device__ __forceinline__ float log_as_glibc(float x) { return static_cast<float>(log(static_cast<double>(x))); }
__device__ __forceinline__ float log2_as_glibc(float x) {
  return static_cast<float>(log2(static_cast<double>(x)));
}

__device__ float block_max(float v, float* scratch) {
#pragma unroll
  for (int s = 16; s > 0; s /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Shared-memory state of one R x C matrix being encoded.
template <int R, int C>
struct MatrixState {
  // The tile as it came, fp16 (exact: the tail is fp16), rows padded to an odd number of words so that both
  // row-per-thread and column-per-thread walks are free of bank conflicts; half the bytes of fp32, so that 6
  // CTAs fit on an SM instead of 3 (a CTA is bound by its own chains of dependent adds, not by issue).
  __half x_half[R][C + 2];
  float log_col[C], inv_col[C], col_std[C], best_col[C];
  float log_row[R], inv_row[R], row_std[R], best_row[R];
  float row_a[R], row_z[R];
  float scratch[8];

  __device__ float x(int r, int c) const { return __half2float(x_half[r][c]); }
};

// cur = x * inv_col * inv_row; unbiased two-pass standard deviations of rows and (when asked) columns.
template <int R, int C>
__device__ void refresh(MatrixState<R, C>& s, bool columns) {
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < R) {
    const float inv_row = s.inv_row[tid];
    float sum = 0;
    for (int c = 0; c < C; ++c) sum = __fadd_rn(sum, __fmul_rn(__fmul_rn(s.x(tid, c), s.inv_col[c]), inv_row));
    const float mean = __fdiv_rn(sum, static_cast<float>(C));
    float dev = 0;
    for (int c = 0; c < C; ++c) {
      const float d = __fsub_rn(__fmul_rn(__fmul_rn(s.x(tid, c), s.inv_col[c]), inv_row), mean);
      dev = __fadd_rn(dev, __fmul_rn(d, d));
    }
    s.row_std[tid] = __fsqrt_rn(__fdiv_rn(dev, static_cast<float>(C - 1)));
  }
  if (columns && tid < C) {
    const float inv_col = s.inv_col[tid];
    float sum = 0;
    for (int r = 0; r < R; ++r) sum = __fadd_rn(sum, __fmul_rn(__fmul_rn(s.x(r, tid), inv_col), s.inv_row[r]));
    const float mean = __fdiv_rn(sum, static_cast<float>(R));
    float dev = 0;
    for (int r = 0; r < R; ++r) {
      const float d = __fsub_rn(__fmul_rn(__fmul_rn(s.x(r, tid), inv_col), s.inv_row[r]), mean);
      dev = __fadd_rn(dev, __fmul_rn(d, d));
    }
    s.col_std[tid] = __fsqrt_rn(__fdiv_rn(dev, static_cast<float>(R - 1)));
  }
  __syncthreads();
}

// max(col_std)/max(min(col_std), 1e-8) + max(row_std)/max(min(row_std), 1e-8), the same in every thread.
template <int R, int C>
__device__ float imbalance(MatrixState<R, C>& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (warp < 2) {
    const float* v = warp == 0 ? s.col_std : s.row_std;
    const int n = warp == 0 ? C : R;
    float lo = FLT_MAX, hi = 0;
    for (int i = lane; i < n; i += 32) {
      lo = fminf(lo, v[i]);
      hi = fmaxf(hi, v[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) {
      s.scratch[2 * warp] = lo;
      s.scratch[2 * warp + 1] = hi;
    }
  }
  __syncthreads();
  const float result = __fadd_rn(__fdiv_rn(s.scratch[1], fmaxf(s.scratch[0], 1e-8f)),
                                 __fdiv_rn(s.scratch[3], fmaxf(s.scratch[2], 1e-8f)));
  __syncthreads();
  return result;
}

__device__ __forceinline__ float step_log_scale(float log_scale, float std_dev) {
  const float next = __fadd_rn(log_scale, log_as_glibc(fminf(fmaxf(std_dev, 1e-3f), 1e3f)));
  return fminf(fmaxf(next, -0.3f), 10.0f);
}

// Spec steps 3-5 for one matrix; X[r][c] = src[r*C + c], or src[c*R + r] when `transposed` (the keys).
template <int R, int C, int BITS>
__device__ void encode_matrix(MatrixState<R, C>& s, const __half* __restrict__ src, bool transposed, bool normalize,
                              uint8_t* __restrict__ codes_out, __half* __restrict__ row_scale_out,
                              __half* __restrict__ row_zero_out, __half* __restrict__ col_scale_out) {
  const int tid = threadIdx.x;
  for (int i = tid; i < R * C; i += kThreads) {
    if (transposed)
      s.x_half[i % R][i / R] = src[i];
    else
      s.x_half[i / C][i % C] = src[i];
  }
  if (tid < C) s.log_col[tid] = 0, s.inv_col[tid] = 1, s.best_col[tid] = 1;
  if (tid < R) s.log_row[tid] = 0, s.inv_row[tid] = 1, s.best_row[tid] = 1;
  if (normalize) {
    refresh(s, true);
    float best = imbalance(s);
    for (int it = 1; it <= kIterations; ++it) {
      if (tid < C) {
        s.log_col[tid] = step_log_scale(s.log_col[tid], s.col_std[tid]);
        s.inv_col[tid] = __fdiv_rn(1.0f, exp_as_glibc(s.log_col[tid]));
      }
      refresh(s, false);
      if (tid < R) {
        s.log_row[tid] = step_log_scale(s.log_row[tid], s.row_std[tid]);
        s.inv_row[tid] = __fdiv_rn(1.0f, exp_as_glibc(s.log_row[tid]));
      }
      refresh(s, true);
      const float current = imbalance(s);
      if (current <= best) {
        best = current;
        if (tid < C) s.best_col[tid] = exp_as_glibc(s.log_col[tid]);
        if (tid < R) s.best_row[tid] = exp_as_glibc(s.log_row[tid]);
      }
    }
  }
  __syncthreads();

  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  constexpr int kCodesPerWord = 32 / BITS, kWordsPerRow = C / kCodesPerWord;
  float row_max = 0;
  if (tid < R) {
    const float row_scale = s.best_row[tid];
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int c = 0; c < C; ++c) {
      const float b = __fdiv_rn(__fdiv_rn(s.x(tid, c), s.best_col[c]), row_scale);
      lo = fminf(lo, b);
      hi = fmaxf(hi, b);
    }
    const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), kMaxCode), 1e-10f);
    auto* row_words = reinterpret_cast<uint32_t*>(codes_out) + tid * kWordsPerRow;
    for (int w = 0; w < kWordsPerRow; ++w) {
      uint32_t word = 0;
      for (int k = 0; k < kCodesPerWord; ++k) {
        const int c = w * kCodesPerWord + k;
        const float b = __fdiv_rn(__fdiv_rn(s.x(tid, c), s.best_col[c]), row_scale);
        const float q = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(b, lo), scale)), 0.0f), kMaxCode);
        word |= static_cast<uint32_t>(q) << (k * BITS);
      }
      row_words[w] = word;
    }
    s.row_a[tid] = __fmul_rn(row_scale, scale);
    s.row_z[tid] = __fmul_rn(row_scale, lo);
    row_max = fmaxf(fabsf(s.row_a[tid]), fabsf(s.row_z[tid]));
  }
  // codec's balance_for_fp16: move a power of two between row and column factors to keep them in fp16's range.
  row_max = block_max(row_max, s.scratch);
  const float outer_max = block_max(tid < C ? s.best_col[tid] : 0.0f, s.scratch);
  int shift = 0;
  if (row_max != 0 && outer_max != 0) {
    if (row_max > 16384.0f) shift = static_cast<int>(ceilf(log2_as_glibc(row_max / 16384.0f)));
    if (row_max < 0x1p-6f) shift = -static_cast<int>(ceilf(log2_as_glibc(0x1p-6f / row_max)));
    while (shift < 0 && outer_max * ldexpf(1.0f, shift) < 0x1p-6f) ++shift;
  }
  if (tid < R) {
    row_scale_out[tid] = __float2half_rn(ldexpf(s.row_a[tid], -shift));
    row_zero_out[tid] = __float2half_rn(ldexpf(s.row_z[tid], -shift));
  }
  if (tid < C) col_scale_out[tid] = __float2half_rn(ldexpf(s.best_col[tid], shift));
}

template <int D, int G, int KB, int VB>
constexpr size_t flush_shared_bytes() {
  const size_t keys = sizeof(MatrixState<D, G>), values = sizeof(MatrixState<G, D>);
  return keys > values ? keys : values;
}

template <int D, int G, int KB, int VB>
__global__ void __launch_bounds__(kThreads) flush_code_tiles_kernel(const TileFlushJob* __restrict__ jobs,
                                                                      const __half* __restrict__ tails,
                                                                      uint8_t* __restrict__ blocks, int num_kv_heads,
                                                                      bool normalize) {
  constexpr codec::TileLayout L = codec::TileLayout::codes(D, G, KB, VB);
  extern __shared__ __align__(16) unsigned char shared[];
  const int head = blockIdx.x % num_kv_heads;
  const int values = (blockIdx.x / num_kv_heads) % 2;
  const TileFlushJob job = jobs[blockIdx.x / (2 * num_kv_heads)];
  const __half* src = tails + ((static_cast<size_t>(job.tail_slot) * 2 + values) * num_kv_heads + head) * G * D;
  uint8_t* tile = blocks + (static_cast<size_t>(job.block) * num_kv_heads + head) * L.bytes;
  auto half_at = [tile](size_t offset) { return reinterpret_cast<__half*>(tile + offset); };
  if (values == 0)
    encode_matrix<D, G, KB>(*reinterpret_cast<MatrixState<D, G>*>(shared), src, true, normalize,
                            tile + L.key_codes, half_at(L.key_scale), half_at(L.key_zero),
                            half_at(L.key_token_scale));
  else
    encode_matrix<G, D, VB>(*reinterpret_cast<MatrixState<G, D>*>(shared), src, false, normalize,
                            tile + L.value_codes, half_at(L.value_scale), half_at(L.value_zero),
                            half_at(L.value_channel_scale));
}

// fp16 tiles are the tail's K then V of one kv-head: 2*G*D*2 bytes copied with 16-byte accesses.
__global__ void copy_tails_to_fp16_tiles_kernel(const TileFlushJob* __restrict__ jobs, const uint4* __restrict__ tails,
                                                uint4* __restrict__ blocks, int num_kv_heads, int half_tile_vectors) {
  const int head = blockIdx.x % num_kv_heads;
  const TileFlushJob job = jobs[blockIdx.x / num_kv_heads];
  for (int i = threadIdx.x; i < 2 * half_tile_vectors; i += blockDim.x) {
    const int which = i / half_tile_vectors, offset = i % half_tile_vectors;
    blocks[(static_cast<size_t>(job.block) * num_kv_heads + head) * 2 * half_tile_vectors + i] =
        tails[((static_cast<size_t>(job.tail_slot) * 2 + which) * num_kv_heads + head) * half_tile_vectors + offset];
  }
}

template <int D, int G, int KB, int VB>
void launch_code_flush(const KvCacheLayer& cache, const TileFlushJob* jobs, int num_jobs, cudaStream_t stream) {
  constexpr size_t shared = flush_shared_bytes<D, G, KB, VB>();
  auto kernel = flush_code_tiles_kernel<D, G, KB, VB>;
  KVARN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<num_jobs * cache.num_kv_heads * 2, kThreads, shared, stream>>>(
      jobs, reinterpret_cast<const __half*>(cache.tails), cache.blocks, cache.num_kv_heads, cache.normalized());
}

}  // namespace

void flush_full_tiles(const KvCacheLayer& cache, const TileFlushJob* jobs, int num_jobs, cudaStream_t stream) {
  if (num_jobs == 0) return;
  const codec::TileLayout& l = cache.layout;
  if (!l.code_tile) {
    const int half_tile_vectors = l.tokens * l.head_dim * 2 / 16;
    copy_tails_to_fp16_tiles_kernel<<<num_jobs * cache.num_kv_heads, 256, 0, stream>>>(
        jobs, reinterpret_cast<const uint4*>(cache.tails), reinterpret_cast<uint4*>(cache.blocks),
        cache.num_kv_heads, half_tile_vectors);
  } else {
    const int key = l.head_dim * 1000 + l.tokens * 10 + l.value_bits;
    switch (key) {
      case 128 * 1000 + 1280 + 2: launch_code_flush<128, 128, 4, 2>(cache, jobs, num_jobs, stream); break;
      case 128 * 1000 + 1280 + 4: launch_code_flush<128, 128, 4, 4>(cache, jobs, num_jobs, stream); break;
      case 128 * 1000 + 640 + 2: launch_code_flush<128, 64, 4, 2>(cache, jobs, num_jobs, stream); break;
      case 128 * 1000 + 640 + 4: launch_code_flush<128, 64, 4, 4>(cache, jobs, num_jobs, stream); break;
      case 64 * 1000 + 1280 + 2: launch_code_flush<64, 128, 4, 2>(cache, jobs, num_jobs, stream); break;
      case 64 * 1000 + 1280 + 4: launch_code_flush<64, 128, 4, 4>(cache, jobs, num_jobs, stream); break;
      case 64 * 1000 + 640 + 2: launch_code_flush<64, 64, 4, 2>(cache, jobs, num_jobs, stream); break;
      case 64 * 1000 + 640 + 4: launch_code_flush<64, 64, 4, 4>(cache, jobs, num_jobs, stream); break;
      default:
        throw_error("flush_full_tiles: no kernel for head_dim " + std::to_string(l.head_dim) + ", G " +
                    std::to_string(l.tokens) + ", value bits " + std::to_string(l.value_bits));
    }
  }
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda
