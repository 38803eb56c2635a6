// Decode attention over fp16 tiles: the 4 warps of a CTA share each tile (a quarter of its tokens each) through a
// cp.async ring of several tiles; the raw fp16 query and K/V on tensor cores, the scale applied to fp32 scores.
#pragma once
#include "backend/cuda/decode_common.cuh"

#include <algorithm>

namespace kvarn::cuda::decode {

// Tiles in flight: fp16 tiles are 16-64 KB.
template <class F>
constexpr int fp16_stages() {
  return F::L.bytes <= 20000 ? 4 : F::L.bytes <= 40000 ? 3 : 2;
}

// Tile copies XOR the 16-byte chunk index of every row with the row's low 3 bits, so that the warps' fragment
// reads hit distinct banks. Thread i copies chunks i, i + 128, ...; 8 rows of chunks divide 128, so the swizzle
// moves all of a thread's chunks by the same offset, computed once per kernel.
template <class F>
__device__ __forceinline__ int fp16_chunk_swizzle_offset(int tid) {
  constexpr int kRowChunks = F::D / 8;
  static_assert(kRowChunks >= 8 && kThreads % (8 * kRowChunks) == 0);
  const int x = tid % kRowChunks;
  return (x ^ ((tid / kRowChunks) & 7)) - x;
}

// Copies one fp16 tile (src: its bytes for one kv-head) into a ring stage: one cp.async per chunk.
template <class F>
__device__ __forceinline__ void copy_fp16_tile(uint8_t* stage, const uint8_t* __restrict__ src, int swizzle) {
  constexpr int kChunks = static_cast<int>(F::L.bytes / 16);
  static_assert(kChunks % kThreads == 0);
  const uint8_t* from = src + 16 * threadIdx.x;  // then constant offsets: one instruction per chunk
  uint8_t* to = stage + 16 * threadIdx.x;
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) cp_async_16(to + 16 * (i * kThreads + swizzle), from + 16 * i * kThreads);
}

// Shared memory of an fp16 CTA: the ring of tiles (reused by the tail's rows and scores and by the final merge),
// then the group's rotated queries.
template <class F>
struct Fp16SharedLayout {
  static constexpr size_t query = std::max(fp16_stages<F>() * F::L.bytes,
                                           sizeof(float) * kWarps * kMaxGroup * (F::D + 2));  // after the ring
  static constexpr size_t bytes = query + sizeof(float) * kMaxGroup * F::D;
};

// Per tile, per warp (a quarter of the tile's tokens, 8 consecutive per n-tile), on tensor cores: S = q K^T with
// the raw fp16 query as A (rows 8-15 zero) and the scale applied to the fp32 scores, then O += P V.
template <class F>
__device__ __forceinline__ void attend_fp16_tiles(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  constexpr int D = F::D, G = F::G, NT = G / 32, KBLK = D / 16, NV = D / 8, S = fp16_stages<F>();
  constexpr codec::TileLayout L = F::L;
  uint8_t* ring = shared;
  float* qs = reinterpret_cast<float*>(shared + Fp16SharedLayout<F>::query);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, col = lane / 4, m4 = lane % 4;
  load_rotated_queries<D>(p, work.partial_row, qs);
  __syncthreads();

  // The raw query is the A operand for every tile (channels kb*16 + 4m + i <-> k-slots).
  uint32_t q_frag[KBLK][2];
#pragma unroll
  for (int kb = 0; kb < KBLK; ++kb) {
    const float* q = qs + col * D + kb * 16 + 4 * m4;
    q_frag[kb][0] = pack_half2(q[0], q[1]);
    q_frag[kb][1] = pack_half2(q[2], q[3]);
  }

  float o[NV][2] = {};
  float m_run = -FLT_MAX, l_run = 0;
  const int32_t* table = p.block_tables + work.seq.block_table_offset;
  const int num = work.end_tile - work.first_tile;
  const int swizzle = fp16_chunk_swizzle_offset<F>(tid);
  auto tile_bytes = [&](int i) {
    return p.blocks + (static_cast<size_t>(table[work.first_tile + i]) * p.num_kv_heads + work.head) * L.bytes;
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < num) copy_fp16_tile<F>(ring + s * L.bytes, tile_bytes(s), swizzle);
    cp_async_commit();
  }
  for (int it = 0; it < num; ++it) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (it + S - 1 < num) copy_fp16_tile<F>(ring + ((it + S - 1) % S) * L.bytes, tile_bytes(it + S - 1), swizzle);
    cp_async_commit();
    const uint8_t* keys = ring + (it % S) * L.bytes + L.key_codes;
    const uint8_t* values = ring + (it % S) * L.bytes + L.value_codes;

    // ---- scores (log2 units); n-tile j of this warp holds tokens 8 (warp NT + j) .. + 7 ----
    float s[NT][2];
    {
      float acc[NT][4] = {};
#pragma unroll
      for (int kb = 0; kb < KBLK; ++kb)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int t = 8 * (warp * NT + j) + col;
          const int chunk = (2 * kb + m4 / 2) ^ (t & 7);
          const uint2 b = *reinterpret_cast<const uint2*>(keys + t * D * 2 + chunk * 16 + (m4 & 1) * 8);
          mma_m16n8k16(acc[j], q_frag[kb][0], q_frag[kb][1], b.x, b.y);
        }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) s[j][e] = acc[j][e] * p.scale_log2;
    }

    // ---- online softmax over this warp's tokens of the tile ----
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < NT; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][0], s[j][1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m_run, tile_max);
    const float correction = exp2_approx(m_run - m_new);
    m_run = m_new;
    l_run *= correction;
    if (__any_sync(0xffffffffu, correction != 1.0f)) {  // after the first tiles the maximum rarely moves
#pragma unroll
      for (int i = 0; i < NV; ++i) o[i][0] *= correction, o[i][1] *= correction;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = exp2_approx(s[j][e] - m_new);
        l_run += s[j][e];
      }

    // ---- values: O[h][c] += sum_t p[h][t] V[t][c]; channel of column x of n-tile i: x NV + i ----
    constexpr int kColChunks = D / 64;  // 16-byte chunks of a column's D/8 channels
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      const uint32_t a0 = pack_half2(s[2 * kk][0], s[2 * kk][1]);
      const uint32_t a2 = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
#pragma unroll
      for (int cc = 0; cc < kColChunks; ++cc) {
        uint4 r[4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int t = 8 * (warp * NT + 2 * kk + jj) + 2 * m4 + e;
            const int chunk = (col * kColChunks + cc) ^ (t & 7);
            r[2 * jj + e] = *reinterpret_cast<const uint4*>(values + t * D * 2 + chunk * 16);
          }
#pragma unroll
        for (int i8 = 0; i8 < 8; ++i8) {
          const uint32_t sel = (i8 & 1) ? 0x7632u : 0x5410u;
          const uint32_t b0 = __byte_perm((&r[0].x)[i8 / 2], (&r[1].x)[i8 / 2], sel);
          const uint32_t b1 = __byte_perm((&r[2].x)[i8 / 2], (&r[3].x)[i8 / 2], sel);
          float c[4] = {o[cc * 8 + i8][0], o[cc * 8 + i8][1], 0, 0};
          mma_m16n8k16(c, a0, a2, b0, b1);
          o[cc * 8 + i8][0] = c[0];
          o[cc * 8 + i8][1] = c[1];
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the merge buffer
  merge_warps_and_write_partial<D>(p, shared, o, m_run, l_run, work.partial_row, work.split);
}

}  // namespace kvarn::cuda::decode
