// Shape contract, per layer: tails[slot][K|V][H][G][D] fp16 -> blocks[block][H][layout.bytes] (codec/tile_layout.h);
// the grid's y index is the layer (a launch flushes a step's full tails in every layer, up to kLayersPerLaunch).
// KVarN: one CTA of 256 threads per (layer, job, kv-head, K|V) encodes one matrix R x C (keys D x G, channel-major;
// values G x D), held in shared memory as it came, fp16. Every sum follows the CPU codec's order
// (codec/variance_normalize.cpp: 8 ordered partials, a halving tree) with one lane per partial and the tree as
// xor shuffles, no FMA contraction beyond the codec's own fma, the scales updated by multiplication: the output
// equals the CPU codec's bit for bit.
// Cost: reads 2*G*D*2 bytes and writes layout.bytes per kv-head. Per normalization iteration one row pass and
// one column pass over the R*C elements (load, convert, scale, sum; then squared deviations), ~10 instructions
// per element and ~15% more for the per-row / per-column steps; 16 iterations: ~17K instructions per warp.
// 4 CTAs per SM (64 registers); H200: one job (16 CTAs) ~47 us, 32 jobs (512 CTAs, one wave) ~106 us at ~71%
// of the issue slots, stalled mostly on shared-memory / shuffle results and barriers.
#include "backend/cuda/flush_full_tiles.h"

#include "backend/cuda/cuda_check.h"
#include "codec/variance_normalize.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <span>
#include <string>

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPartials = 8;  // lanes per row or column sum
static_assert(codec::kSumPartials == kPartials);

__device__ __forceinline__ float log2_as_libm(float x) { return static_cast<float>(log2(static_cast<double>(x))); }

// The codec's halving tree over 8 partials held by the lanes `far` (partial k + 4), 2 (k + 2) and 1 (k + 1)
// apart: after each xor step every lane holds the sum the tree forms at that level (float addition commutes).
__device__ __forceinline__ float tree_sum(float v, int far) {
  v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, far));
  v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 1));
}

__device__ float block_max(float v, float* scratch) {
#pragma unroll
  for (int s = 16; s > 0; s /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Shared-memory state of one R x C matrix being encoded.
template <int R, int C>
struct MatrixState {
  // Rows (C + 8) halves apart, (C + 8) / 2 = 4 mod 8 words: the row walk (a quarter warp reads 16-byte pieces of
  // two adjacent rows, or of one row when C = 64) and the column walk (8 rows x 4 column pairs) are both free of
  // bank conflicts.
  static constexpr int kStride = C + 8;
  __half x[R][kStride];
  alignas(16) float inv_col[C];
  float col_scale[C], col_dev[C], col_std[C], best_col_scale[C];
  float row_scale[R], inv_row[R], row_dev[R], row_std[R], best_row_scale[R];
  // inv_row[k + 8m] at [k][m]: the factors a column-walk lane reads, in order, rows 4 words apart from the
  // previous row's bank group (R/8 + 4 = 4 mod 8 words) so that 8 lanes' 16-byte reads do not conflict.
  static constexpr int kByPartialStride = R / 8 + 4;
  alignas(16) float inv_row_by_partial[kPartials][kByPartialStride];
  float row_a[R], row_z[R];
  float scratch[4 * kWarps];
};

// The row walk: the 8 lanes of a row hold its 8 chunks of C/8 consecutive columns; a warp covers 4 rows per
// step. For C = 128 a quarter warp takes chunks 0-3 of two adjacent rows (bank-conflict free), so chunk k + 4 is
// 8 lanes away; for C = 64 it takes one row's 8 chunks.
template <int C>
struct RowWalk {
  static constexpr int kChunk = C / kPartials;
  static constexpr int kFar = C == 128 ? 8 : 4;
  static_assert(C == 64 || C == 128);
  __device__ static int chunk(int lane) { return C == 128 ? (lane & 3) | ((lane >> 1) & 4) : lane & 7; }
  __device__ static int row(int lane) { return C == 128 ? ((lane >> 2) & 1) | ((lane >> 3) & 2) : lane >> 3; }
};

// The kChunk halves of `row` at chunk k, converted to float.
template <int R, int C>
__device__ __forceinline__ void load_chunk(const MatrixState<R, C>& s, int row, int k, float* out) {
  constexpr int kVectors = RowWalk<C>::kChunk / 8;
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {
    const uint4 bits = *reinterpret_cast<const uint4*>(&s.x[row][k * RowWalk<C>::kChunk + 8 * v]);
    const __half2* h = reinterpret_cast<const __half2*>(&bits);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[8 * v + 2 * i] = f.x;
      out[8 * v + 2 * i + 1] = f.y;
    }
  }
}

// The sums of squared deviations of x * col_factor along each row (out[row]) and of x * row_factor down each
// column (out[col]), two-pass, in the codec's order; spread() turns them into standard deviations, one thread
// per row or column. The mean divides by a power of two: the multiplication is exact and equal.
template <int R, int C>
__device__ void row_deviations(const MatrixState<R, C>& s, const float* col_factor, float* out) {
  constexpr int L = RowWalk<C>::kChunk;
  static_assert((C & (C - 1)) == 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, k = RowWalk<C>::chunk(lane);
  float factor[L];
#pragma unroll
  for (int j = 0; j < L; j += 4)
    *reinterpret_cast<float4*>(&factor[j]) = *reinterpret_cast<const float4*>(&col_factor[k * L + j]);
  // Two rows per lane at a time: their chains of adds and shuffles interleave.
  static_assert(R / (4 * kWarps) % 2 == 0);
#pragma unroll
  for (int step = 0; step < R / (4 * kWarps); step += 2) {
    int row[2];
    float y[2][L], sum[2], mean[2], dev[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      row[p] = ((step + p) * kWarps + warp) * 4 + RowWalk<C>::row(lane);
      load_chunk(s, row[p], k, y[p]);
#pragma unroll
      for (int j = 0; j < L; ++j) y[p][j] = __fmul_rn(y[p][j], factor[j]);
      sum[p] = y[p][0];  // the codec's 0 + y[0] but for the sign of an all-zero sum, which no deviation sees
#pragma unroll
      for (int j = 1; j < L; ++j) sum[p] = __fadd_rn(sum[p], y[p][j]);
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) mean[p] = __fmul_rn(tree_sum(sum[p], RowWalk<C>::kFar), 1.0f / C);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      dev[p] = 0;
#pragma unroll
      for (int j = 0; j < L; ++j) {
        const float d = __fsub_rn(y[p][j], mean[p]);
        dev[p] = __fmaf_rn(d, d, dev[p]);
      }
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      dev[p] = tree_sum(dev[p], RowWalk<C>::kFar);
      if (k == 0) out[row[p]] = dev[p];
    }
  }
}

// The column walk: lane k sums rows k, k + 8, ... (the codec's strided partials) of 2 adjacent columns; a warp
// covers 4 column pairs per step. Its row factors come in the order it walks them (inv_row_by_partial).
template <int R, int C>
__device__ void column_deviations(const MatrixState<R, C>& s,
                                  const float (*row_factor_by_partial)[MatrixState<R, C>::kByPartialStride],
                                  float* out) {
  constexpr int M = R / kPartials;
  static_assert((R & (R - 1)) == 0 && M % 4 == 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, k = lane & 7;
  const float4* factors = reinterpret_cast<const float4*>(row_factor_by_partial[k]);
#pragma unroll
  for (int step = 0; step < C / (8 * kWarps); ++step) {
    const int col = 2 * ((step * kWarps + warp) * 4 + lane / 8);
    float2 z[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&s.x[k + kPartials * m][col]));
      const float4 four = factors[m / 4];
      const float factor = m % 4 == 0 ? four.x : m % 4 == 1 ? four.y : m % 4 == 2 ? four.z : four.w;
      z[m] = {__fmul_rn(v.x, factor), __fmul_rn(v.y, factor)};
    }
    float2 sum = z[0];
#pragma unroll
    for (int m = 1; m < M; ++m) sum = {__fadd_rn(sum.x, z[m].x), __fadd_rn(sum.y, z[m].y)};
    const float2 mean = {__fmul_rn(tree_sum(sum.x, 4), 1.0f / R), __fmul_rn(tree_sum(sum.y, 4), 1.0f / R)};
    float2 dev = {0, 0};
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float dx = __fsub_rn(z[m].x, mean.x), dy = __fsub_rn(z[m].y, mean.y);
      dev = {__fmaf_rn(dx, dx, dev.x), __fmaf_rn(dy, dy, dev.y)};
    }
    dev = {tree_sum(dev.x, 4), tree_sum(dev.y, 4)};
    if (k == 0) out[col] = dev.x, out[col + 1] = dev.y;
  }
}

// Unbiased standard deviation from a sum of squared deviations over n terms.
__device__ __forceinline__ float spread(float deviations, int n) {
  return __fsqrt_rn(__fdiv_rn(deviations, static_cast<float>(n - 1)));
}

// After a column pass: col_std = inv_col * the column spreads, then the imbalance
// max(col_std)/max(min(col_std), 1e-8) + max(row_std)/max(min(row_std), 1e-8) in the threads that keep scales
// (tid < max(R, C); the others get 0): each of their warps reduces its own rows and columns, one barrier.
template <int R, int C>
__device__ float column_stds_and_imbalance(MatrixState<R, C>& s) {
  constexpr int kScaleWarps = (R > C ? R : C) / 32;
  const int tid = threadIdx.x, warp = tid / 32;
  float col_lo = FLT_MAX, col_hi = 0, row_lo = FLT_MAX, row_hi = 0;
  if (tid < C) col_lo = col_hi = s.col_std[tid] = __fmul_rn(s.inv_col[tid], spread(s.col_dev[tid], R));
  if (tid < R) row_lo = row_hi = s.row_std[tid];
  if (warp < kScaleWarps) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      col_lo = fminf(col_lo, __shfl_xor_sync(0xffffffffu, col_lo, o));
      col_hi = fmaxf(col_hi, __shfl_xor_sync(0xffffffffu, col_hi, o));
      row_lo = fminf(row_lo, __shfl_xor_sync(0xffffffffu, row_lo, o));
      row_hi = fmaxf(row_hi, __shfl_xor_sync(0xffffffffu, row_hi, o));
    }
    if ((tid & 31) == 0) {
      s.scratch[4 * warp] = col_lo, s.scratch[4 * warp + 1] = col_hi;
      s.scratch[4 * warp + 2] = row_lo, s.scratch[4 * warp + 3] = row_hi;
    }
  }
  __syncthreads();
  if (warp >= kScaleWarps) return 0;
#pragma unroll
  for (int w = 0; w < kScaleWarps; ++w) {
    col_lo = fminf(col_lo, s.scratch[4 * w]), col_hi = fmaxf(col_hi, s.scratch[4 * w + 1]);
    row_lo = fminf(row_lo, s.scratch[4 * w + 2]), row_hi = fmaxf(row_hi, s.scratch[4 * w + 3]);
  }
  return __fadd_rn(__fdiv_rn(col_hi, fmaxf(col_lo, 1e-8f)), __fdiv_rn(row_hi, fmaxf(row_lo, 1e-8f)));
}

// The codec's multiplicative form of the spec's log-domain step (codec/variance_normalize.cpp).
__device__ __forceinline__ float step_scale(float scale, float std_dev) {
  const float factor = fminf(fmaxf(std_dev, codec::kStdFloor), codec::kStdCeil);
  return fminf(fmaxf(__fmul_rn(scale, factor), codec::kScaleMin), codec::kScaleMax);
}

// Spec step 3 as codec::variance_normalize computes it: leaves col_scale / row_scale (the kept iterate) and
// inv_col / inv_row (their reciprocals).
template <int R, int C>
__device__ void normalize(MatrixState<R, C>& s) {
  const int tid = threadIdx.x;
  row_deviations(s, s.inv_col, s.row_dev);
  column_deviations(s, s.inv_row_by_partial, s.col_dev);
  __syncthreads();
  if (tid < R) s.row_std[tid] = spread(s.row_dev[tid], C);
  float best = column_stds_and_imbalance(s);
  for (int it = 1; it <= codec::kNormalizationIterations; ++it) {
    if (tid < C) {
      s.col_scale[tid] = step_scale(s.col_scale[tid], s.col_std[tid]);
      s.inv_col[tid] = __fdiv_rn(1.0f, s.col_scale[tid]);
    }
    __syncthreads();
    row_deviations(s, s.inv_col, s.row_dev);
    __syncthreads();
    if (tid < R) {
      const float row_spread = spread(s.row_dev[tid], C);
      s.row_scale[tid] = step_scale(s.row_scale[tid], __fmul_rn(s.inv_row[tid], row_spread));
      s.inv_row[tid] = __fdiv_rn(1.0f, s.row_scale[tid]);
      s.row_std[tid] = __fmul_rn(s.inv_row[tid], row_spread);
      s.inv_row_by_partial[tid % kPartials][tid / kPartials] = s.inv_row[tid];
    }
    __syncthreads();
    column_deviations(s, s.inv_row_by_partial, s.col_dev);
    __syncthreads();
    const float current = column_stds_and_imbalance(s);
    if (current <= __fmul_rn(best, codec::kTieMargin)) {
      best = current;
      if (tid < C) s.best_col_scale[tid] = s.col_scale[tid];
      if (tid < R) s.best_row_scale[tid] = s.row_scale[tid];
    }
  }
  if (tid < C) {
    s.col_scale[tid] = s.best_col_scale[tid];
    s.inv_col[tid] = __fdiv_rn(1.0f, s.col_scale[tid]);
  }
  if (tid < R) {
    s.row_scale[tid] = s.best_row_scale[tid];
    s.inv_row[tid] = __fdiv_rn(1.0f, s.row_scale[tid]);
  }
}

// Spec step 4 on B = x * inv_col * inv_row in the row walk: each lane rounds its chunk of a row against the
// row's range and stores its codes (C/8 codes of BITS bits: 16 to 64 bits, aligned).
template <int R, int C, int BITS>
__device__ void quantize_rows(MatrixState<R, C>& s, uint8_t* __restrict__ codes_out) {
  constexpr int L = RowWalk<C>::kChunk;
  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, k = RowWalk<C>::chunk(lane);
  float inv_col[L];
#pragma unroll
  for (int j = 0; j < L; j += 4)
    *reinterpret_cast<float4*>(&inv_col[j]) = *reinterpret_cast<const float4*>(&s.inv_col[k * L + j]);
#pragma unroll 1
  for (int step = 0; step < R / (4 * kWarps); ++step) {
    const int row = (step * kWarps + warp) * 4 + RowWalk<C>::row(lane);
    float b[L];
    load_chunk(s, row, k, b);
    const float inv_row = s.inv_row[row];
    float lo = FLT_MAX, hi = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      b[j] = __fmul_rn(__fmul_rn(b[j], inv_col[j]), inv_row);
      lo = fminf(lo, b[j]);
      hi = fmaxf(hi, b[j]);
    }
    const int far[3] = {RowWalk<C>::kFar, 2, 1};
#pragma unroll
    for (int o : far) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), kMaxCode), 1e-10f), inv_scale = __fdiv_rn(1.0f, scale);
    uint64_t word = 0;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const float q = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(b[j], lo), inv_scale)), 0.0f), kMaxCode);
      word |= static_cast<uint64_t>(q) << (j * BITS);
    }
    uint8_t* out = codes_out + row * (C * BITS / 8) + k * (L * BITS / 8);
    if constexpr (L * BITS == 64) *reinterpret_cast<uint64_t*>(out) = word;
    if constexpr (L * BITS == 32) *reinterpret_cast<uint32_t*>(out) = static_cast<uint32_t>(word);
    if constexpr (L * BITS == 16) *reinterpret_cast<uint16_t*>(out) = static_cast<uint16_t>(word);
    if (k == 0) {
      s.row_a[row] = __fmul_rn(s.row_scale[row], scale);
      s.row_z[row] = __fmul_rn(s.row_scale[row], lo);
    }
  }
}

// Spec steps 3-5 for one matrix; X[r][c] = src[r*C + c], or src[c*R + r] when `transposed` (the keys).
template <int R, int C, int BITS>
__device__ void encode_matrix(MatrixState<R, C>& s, const __half* __restrict__ src, bool transposed, bool normalize_it,
                              uint8_t* __restrict__ codes_out, __half* __restrict__ row_scale_out,
                              __half* __restrict__ row_zero_out, __half* __restrict__ col_scale_out) {
  const int tid = threadIdx.x;
  for (int v = tid; v < R * C / 8; v += kThreads) {  // 8 consecutive halves of the source per thread
    if (transposed) {  // neighbouring threads take neighbouring tokens: their 2-byte stores fill a row's words
      const int col = v % C, row = v / C * 8;
      const uint4 bits = reinterpret_cast<const uint4*>(src)[(col * R + row) / 8];
      const __half* h = reinterpret_cast<const __half*>(&bits);
#pragma unroll
      for (int i = 0; i < 8; ++i) s.x[row + i][col] = h[i];
    } else {
      *reinterpret_cast<uint4*>(&s.x[v / (C / 8)][v % (C / 8) * 8]) = reinterpret_cast<const uint4*>(src)[v];
    }
  }
  if (tid < C) s.col_scale[tid] = 1, s.inv_col[tid] = 1, s.best_col_scale[tid] = 1;
  if (tid < R) {
    s.row_scale[tid] = 1, s.inv_row[tid] = 1, s.best_row_scale[tid] = 1;
    s.inv_row_by_partial[tid % kPartials][tid / kPartials] = 1;
  }
  __syncthreads();
  if (normalize_it) normalize(s);
  __syncthreads();
  quantize_rows<R, C, BITS>(s, codes_out);
  __syncthreads();

  // codec's balance_for_fp16: move a power of two between row and column factors to keep them in fp16's range.
  const float row_max = block_max(tid < R ? fmaxf(fabsf(s.row_a[tid]), fabsf(s.row_z[tid])) : 0.0f, s.scratch);
  const float outer_max = block_max(tid < C ? s.col_scale[tid] : 0.0f, s.scratch);
  int shift = 0;
  if (row_max != 0 && outer_max != 0) {
    if (row_max > 16384.0f) shift = static_cast<int>(ceilf(log2_as_libm(row_max / 16384.0f)));
    if (row_max < 0x1p-6f) shift = -static_cast<int>(ceilf(log2_as_libm(0x1p-6f / row_max)));
    while (shift < 0 && outer_max * ldexpf(1.0f, shift) < 0x1p-6f) ++shift;
  }
  if (tid < R) {
    row_scale_out[tid] = __float2half_rn(ldexpf(s.row_a[tid], -shift));
    row_zero_out[tid] = __float2half_rn(ldexpf(s.row_z[tid], -shift));
  }
  if (tid < C) col_scale_out[tid] = __float2half_rn(ldexpf(s.col_scale[tid], shift));
}

template <int D, int G, int KB, int VB>
constexpr size_t flush_shared_bytes() {
  const size_t keys = sizeof(MatrixState<D, G>), values = sizeof(MatrixState<G, D>);
  return keys > values ? keys : values;
}

// The tails and blocks of a launch's layers, by the grid's y index: kernel parameters (2 KB), so that a launch
// needs no device array of them.
constexpr int kLayersPerLaunch = 128;
struct FlushLayers {
  const void* tails[kLayersPerLaunch];
  void* blocks[kLayersPerLaunch];
};

template <int D, int G, int KB, int VB>
__global__ void __launch_bounds__(kThreads, 4) flush_code_tiles_kernel(const TileFlushJob* __restrict__ jobs,
                                                                      const FlushLayers layers, int num_kv_heads,
                                                                      bool normalize) {
  constexpr codec::TileLayout L = codec::TileLayout::codes(D, G, KB, VB);
  extern __shared__ __align__(16) unsigned char shared[];
  const auto* __restrict__ tails = static_cast<const __half*>(layers.tails[blockIdx.y]);
  auto* __restrict__ blocks = static_cast<uint8_t*>(layers.blocks[blockIdx.y]);
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
__global__ void copy_tails_to_fp16_tiles_kernel(const TileFlushJob* __restrict__ jobs, const FlushLayers layers,
                                                int num_kv_heads, int half_tile_vectors) {
  const auto* __restrict__ tails = static_cast<const uint4*>(layers.tails[blockIdx.y]);
  auto* __restrict__ blocks = static_cast<uint4*>(layers.blocks[blockIdx.y]);
  const int head = blockIdx.x % num_kv_heads;
  const TileFlushJob job = jobs[blockIdx.x / num_kv_heads];
  for (int i = threadIdx.x; i < 2 * half_tile_vectors; i += blockDim.x) {
    const int which = i / half_tile_vectors, offset = i % half_tile_vectors;
    blocks[(static_cast<size_t>(job.block) * num_kv_heads + head) * 2 * half_tile_vectors + i] =
        tails[((static_cast<size_t>(job.tail_slot) * 2 + which) * num_kv_heads + head) * half_tile_vectors + offset];
  }
}

template <int D, int G, int KB, int VB>
void launch_code_flush(const KvCacheLayer& cache, const TileFlushJob* jobs, dim3 grid, const FlushLayers& layers,
                       cudaStream_t stream) {
  constexpr size_t shared = flush_shared_bytes<D, G, KB, VB>();
  auto kernel = flush_code_tiles_kernel<D, G, KB, VB>;
  KVARN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<grid, kThreads, shared, stream>>>(jobs, layers, cache.num_kv_heads, cache.normalized());
}

// One launch for up to kLayersPerLaunch layers.
void flush_layers(std::span<const KvCacheLayer> layers, const TileFlushJob* jobs, int num_jobs,
                  cudaStream_t stream) {
  const KvCacheLayer& cache = layers.front();
  const codec::TileLayout& l = cache.layout;
  FlushLayers pointers{};
  for (size_t i = 0; i < layers.size(); ++i) {
    pointers.tails[i] = layers[i].tails;
    pointers.blocks[i] = layers[i].blocks;
  }
  const long ctas = static_cast<long>(num_jobs) * cache.num_kv_heads * (l.code_tile ? 2 : 1);
  if (ctas > 0x7fffffffL)
    throw_error("flush_full_tiles: " + std::to_string(num_jobs) + " jobs x " + std::to_string(cache.num_kv_heads) +
                " kv heads exceed the grid limit (2^31 - 1 CTAs per layer)");
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(layers.size()));
  if (!l.code_tile) {
    copy_tails_to_fp16_tiles_kernel<<<grid, 256, 0, stream>>>(jobs, pointers, cache.num_kv_heads,
                                                              l.tokens * l.head_dim * 2 / 16);
  } else {
    const int key = l.head_dim * 1000 + l.tokens * 10 + l.value_bits;
    switch (key) {
      case 128 * 1000 + 1280 + 2: launch_code_flush<128, 128, 4, 2>(cache, jobs, grid, pointers, stream); break;
      case 128 * 1000 + 1280 + 4: launch_code_flush<128, 128, 4, 4>(cache, jobs, grid, pointers, stream); break;
      case 128 * 1000 + 640 + 2: launch_code_flush<128, 64, 4, 2>(cache, jobs, grid, pointers, stream); break;
      case 128 * 1000 + 640 + 4: launch_code_flush<128, 64, 4, 4>(cache, jobs, grid, pointers, stream); break;
      case 64 * 1000 + 1280 + 2: launch_code_flush<64, 128, 4, 2>(cache, jobs, grid, pointers, stream); break;
      case 64 * 1000 + 1280 + 4: launch_code_flush<64, 128, 4, 4>(cache, jobs, grid, pointers, stream); break;
      case 64 * 1000 + 640 + 2: launch_code_flush<64, 64, 4, 2>(cache, jobs, grid, pointers, stream); break;
      case 64 * 1000 + 640 + 4: launch_code_flush<64, 64, 4, 4>(cache, jobs, grid, pointers, stream); break;
      default:
        throw_error("flush_full_tiles: no kernel for head_dim " + std::to_string(l.head_dim) + ", G " +
                    std::to_string(l.tokens) + ", value bits " + std::to_string(l.value_bits));
    }
  }
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void flush_full_tiles(std::span<const KvCacheLayer> layers, const TileFlushJob* jobs, int num_jobs,
                      cudaStream_t stream) {
  if (num_jobs < 0) throw_error("flush_full_tiles: num_jobs " + std::to_string(num_jobs) + "; expected >= 0");
  if (num_jobs == 0 || layers.empty()) return;
  check_device_memory(jobs, alignof(TileFlushJob), "flush_full_tiles", "jobs", "[num_jobs] TileFlushJob");
  const KvCacheLayer& first = layers.front();
  for (size_t i = 0; i < layers.size(); ++i) {
    const KvCacheLayer& layer = layers[i];
    check_kv_cache_layer(layer, "flush_full_tiles");
    if (!layer.tails || !layer.blocks)
      throw_error("flush_full_tiles: layer " + std::to_string(i) + " has no " + (layer.tails ? "blocks" : "tails") +
                  "; expected the device memory of a cache (make_kv_cache_layer's blocks and tails)");
    if (layer.num_kv_heads != first.num_kv_heads || layer.method != first.method || layer.layout != first.layout)
      throw_error("flush_full_tiles: layer " + std::to_string(i) + " has " + std::to_string(layer.num_kv_heads) +
                  " kv heads of head_dim " + std::to_string(layer.head_dim()) + " in tiles of " +
                  std::to_string(layer.layout.bytes) + " bytes, layer 0 " + std::to_string(first.num_kv_heads) +
                  " of " + std::to_string(first.head_dim()) + " in " + std::to_string(first.layout.bytes) +
                  "; expected the layers of one cache");
  }
  for (size_t begin = 0; begin < layers.size(); begin += kLayersPerLaunch)
    flush_layers(layers.subspan(begin, std::min<size_t>(kLayersPerLaunch, layers.size() - begin)), jobs, num_jobs,
                 stream);
}

}  // namespace kvarn::cuda
