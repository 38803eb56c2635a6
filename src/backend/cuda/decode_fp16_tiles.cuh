// Decode attention over fp16 rows on tensor cores: the fp16 cache's tiles, whose 4 warps of a CTA share each tile
// (a quarter of its tokens each) through a cp.async ring of several tiles, and every cache's fp16 tail, read the
// same way; the query as an fp16 pair (high part, rest), the scale applied to the fp32 scores.
#pragma once
#include "backend/cuda/decode_common.cuh"

#include <algorithm>
#include <cmath>

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
  static constexpr size_t query = std::max(fp16_stages<F>() * F::L.bytes, merge_buffer_bytes(F::D));  // after the ring
  static constexpr size_t bytes = query + sizeof(float) * kMaxGroup * F::D;
};

// The query as A fragments for every k-block (lane (g, m): head g, channels 16 kb + 4m + i <-> k-slots 2m, 2m + 1,
// 2m + 8, 2m + 9): rows g its fp16 rounding, rows g + 8 the fp16 rounding of the rest (split_half2), so that scores
// carry ~2^-22 of the query's relative rounding rather than 2^-12 and a large score moves no other weight.
// qs: fp32 rows [kMaxGroup][D] (load_rotated_queries).
template <int D>
__device__ __forceinline__ void query_fragments(const float* qs, uint32_t (&qa)[D / 16][4]) {
  const int lane = threadIdx.x & 31, col = lane / 4, m4 = lane % 4;
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) {
    const float4 q = *reinterpret_cast<const float4*>(qs + col * D + kb * 16 + 4 * m4);
    split_half2(q.x, q.y, qa[kb][0], qa[kb][1]);
    split_half2(q.z, q.w, qa[kb][2], qa[kb][3]);
  }
}

// One warp's share of fp16 K/V rows in shared memory (rows swizzled as copy_fp16_tile places them), on tensor
// cores: its NT n-tiles of 8 tokens from n-tile `first` (tokens 8 (first + j) + x), tokens >= `valid` masked out.
// S = q K^T (qa: query_fragments) scaled to log2 units in fp32, one online-softmax step of the warp's state
// (o, m_run, l_run), then O += P V with P in fp16.
template <class F, int NT>
__device__ __forceinline__ void attend_fp16_rows(const uint8_t* keys, const uint8_t* values, int first, int valid,
                                                 const uint32_t (&qa)[F::D / 16][4], float scale_log2,
                                                 float (&o)[F::D / 8][2], float& m_run, float& l_run) {
  constexpr int D = F::D, KBLK = D / 16, NV = D / 8;
  const int lane = threadIdx.x & 31, col = lane / 4, m4 = lane % 4;

  // ---- scores (log2 units); n-tile j holds tokens 8 (first + j) .. + 7 ----
  float s[NT][2];
  {
    float acc[NT][4] = {};
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int t = 8 * (first + j) + col;
        const int chunk = (2 * kb + m4 / 2) ^ (t & 7);
        const uint2 b = *reinterpret_cast<const uint2*>(keys + t * D * 2 + chunk * 16 + (m4 & 1) * 8);
        mma_m16n8k16_rows16(acc[j], qa[kb], b.x, b.y);
      }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool past = 8 * (first + j) + 2 * m4 + e >= valid;
        s[j][e] = past ? -INFINITY : (acc[j][e] + acc[j][e + 2]) * scale_log2;
      }
  }

  // ---- online softmax over this warp's tokens ----
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
          const int t = 8 * (first + 2 * kk + jj) + 2 * m4 + e;
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

// Per tile, the 4 warps a quarter of its tokens each (attend_fp16_rows), the tiles through a cp.async ring; the
// warps' states are left in the merge buffer (store_warp_state).
template <class F>
__device__ __forceinline__ void attend_fp16_tiles(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  constexpr int D = F::D, G = F::G, NT = G / 32, KBLK = D / 16, NV = D / 8, S = fp16_stages<F>();
  constexpr codec::TileLayout L = F::L;
  uint8_t* ring = shared;
  float* qs = reinterpret_cast<float*>(shared + Fp16SharedLayout<F>::query);
  const int tid = threadIdx.x, warp = tid / 32;
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
  wait_for_previous_kernel();
  load_rotated_queries<D>(p, work.partial_row, qs);  // while the first tiles stream in
  __syncthreads();
  uint32_t qa[KBLK][4];
  query_fragments<D>(qs, qa);
  float o[NV][2] = {};
  float m_run = -FLT_MAX, l_run = 0;
  for (int it = 0; it < num; ++it) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (it + S - 1 < num) copy_fp16_tile<F>(ring + ((it + S - 1) % S) * L.bytes, tile_bytes(it + S - 1), swizzle);
    cp_async_commit();
    const uint8_t* tile = ring + (it % S) * L.bytes;
    attend_fp16_rows<F, NT>(tile + L.key_codes, tile + L.value_codes, warp * NT, G, qa, p.scale_log2, o, m_run,
                            l_run);
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the merge buffer
  store_warp_state<D>(p, shared, o, m_run, l_run);
}

// Shared memory of a tail's read: the tail's key rows, its value rows (G each, as an fp16 tile's), the queries;
// in a tile CTA that reads its pair's tail, then the tiles' merged state, [head][D + 4]: o[D], m, l (the merge
// buffer, from 0, holds the tail's warps' states after its rows).
template <class F>
struct TailSharedLayout {
  static constexpr size_t keys = 0, values = size_t{2} * F::G * F::D, query = 2 * values;
  static constexpr size_t tiles_state = query + sizeof(float) * kMaxGroup * F::D;
  static constexpr size_t bytes = tiles_state + sizeof(float) * kMaxGroup * (F::D + 4);
  static_assert(merge_buffer_bytes(F::D) <= tiles_state, "the merge buffer would reach it");
};

// The fp16 tail (rotated like the tiles) of one (sequence, kv-head), 1 to G - 1 tokens, read like an fp16 tile:
// its key and value rows copied into shared memory at once, the value rows up to the end of the last warp's
// n-tiles zeroed (their weights are 0, but 0 * NaN is not), then each warp its quarter of the rows
// (attend_fp16_rows); their states are left in the merge buffer (store_warp_state).
template <class F>
__device__ void attend_tail(const DecodeParams& p, const SequenceKvView& seq, int head, size_t partial_row,
                            uint8_t* shared) {
  constexpr int D = F::D, G = F::G, NT = G / 32, KBLK = D / 16, NV = D / 8, kRowChunks = D / 8;
  using Layout = TailSharedLayout<F>;
  const int n = seq.tail_len, tid = threadIdx.x, warp = tid / 32;
  const __half* k = p.tails + ((static_cast<size_t>(seq.tail_slot) * 2) * p.num_kv_heads + head) * G * D;
  const __half* v = k + static_cast<size_t>(p.num_kv_heads) * G * D;
  uint8_t* keys = shared + Layout::keys;
  uint8_t* values = shared + Layout::values;
  for (int q = tid; q < n * kRowChunks; q += kThreads) {
    const int row = q / kRowChunks, at = 16 * (row * kRowChunks + ((q % kRowChunks) ^ (row & 7)));
    cp_async_16(keys + at, k + 8 * q);
    cp_async_16(values + at, v + 8 * q);
  }
  cp_async_commit();
  const int rows_read = min(G, (n + 8 * NT - 1) / (8 * NT) * (8 * NT));
  for (int q = n * kRowChunks + tid; q < rows_read * kRowChunks; q += kThreads)
    *reinterpret_cast<uint4*>(values + 16 * q) = make_uint4(0, 0, 0, 0);
  float* qs = reinterpret_cast<float*>(shared + Layout::query);
  load_rotated_queries<D>(p, partial_row, qs);
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qa[KBLK][4];
  query_fragments<D>(qs, qa);
  float o[NV][2] = {};
  float m_run = -FLT_MAX, l_run = 0;
  if (8 * NT * warp < n) attend_fp16_rows<F, NT>(keys, values, warp * NT, n, qa, p.scale_log2, o, m_run, l_run);
  __syncthreads();  // the rows are read: the merge buffer replaces them
  store_warp_state<D>(p, shared, o, m_run, l_run);
}

}  // namespace kvarn::cuda::decode
