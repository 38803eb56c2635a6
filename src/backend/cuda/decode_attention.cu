// Shape contract: see decode_attention.h; cache layout: kv_layout.h; tile layout: codec/tile_layout.h.
//
// decode_attention_kernel: 1-D grid of pairs * (num_splits + 1) CTAs over the (sequence n, kv-head h) pairs, 128
// threads (4 warps). The first `pairs` CTAs read the fp16 tails (rows staged in shared memory, fp32 arithmetic;
// short, and first so that they do not trail the launch); then pair-major, CTA split s of pair (n, h) reads the
// tiles [s*tps, (s+1)*tps) of sequence n, kv-head h through cp.async copies of whole tiles into shared memory
// (16-byte pieces, tiles in flight while others are read). Each CTA leaves one partial softmax state (m, l, o[D])
// per q head; a tile CTA's 4 warps keep their own online softmax and merge at the end. (Measured and not kept,
// H200: the tail read by the pair's last tile CTA puts it on the critical path, 1.3-1.6x slower at batch 1-8 x 1K;
// a separate tail kernel, a programmatic dependent, costs a launch, 1.2-1.3x slower there, and pays only at batch
// >= 32 x 1K, where the tail CTAs' tile-sized shared memory halves the CTAs per SM.)
// On tensor cores (mma m16n8k16, rows = the <= 8 q heads of the group):
//   scores  S[h][t] = s_tok[t] * (sum_c (q'[h][c] a_K[c]) code[c][t] + sum_c q'[h][c] z_K[c])   (K = channels)
//   values  O[h][c] += s_ch[c] * (sum_t (p[h][t] a_V[t]) code[t][c] + sum_t p[h][t] z_V[t])    (K = tokens)
// KVarN: one warp reads a whole tile (warps take every 4th tile of the split, each through its own two slots), so
// that the fold of a_K into the query, the scales and the per-channel end of the values are paid per tile rather
// than per quarter tile, and nothing but warp barriers separates tiles (1.24-1.38x the speed of 4 warps sharing
// each tile, H200, docs/benchmarks.md). The A operands (q' a_K, p a_V) are split into an fp16 high part (rows 0-7)
// and the fp16 rounding of the rest (rows 8-15, otherwise padding), so the two row halves of the result add up to
// the operand with ~2^-22 instead of 2^-12 relative rounding: a sink's large score does not move the other weights.
// Codes enter as the raw bits of fp16 subnormals, code * 2^k * 2^-24 for a code at bit k of a 16-bit half (one mask
// per two codes, exact; the tensor cores take subnormal fp16 inputs), and 2^(24-k) comes off in fp32; no dequantized
// copy is ever written. The token and channel orders inside an mma are permuted so that each thread's B operand
// comes from one 32-bit word of the packed rows (any permutation of the reduced index, used consistently in A and B,
// gives the same sum). fp16 tiles: the 4 warps share each tile (a quarter of its tokens each) through a ring of
// several tiles; the raw fp16 q, p and K/V with rows 8-15 zero, the scale applied to the fp32 scores.
// Bytes per (sequence, kv-head): num_tiles * layout.bytes + tail_len * 2*D*2 + q/out/partials (small).
// FLOPs (tensor cores, useful): 4 * G_q * D per token; the mma's 16 rows make 16/G_q x that issued (KVarN: rows
// 8-15 carry the lo parts).
//
// decode_combine_kernel: one warp per (sequence, q head): merges the partials, divides by l, rotates back (H_D)
// for rotated dtypes, writes fp16. The lanes read the partials' (m, l) in parallel and the partial outputs four at
// a time (a split-K of 32 at batch 1 was 64 dependent round trips to L2). On Hopper it is launched as a
// programmatic dependent of the attention kernel, whose CTAs release it when they start: it is resident and
// waiting (griddepcontrol.wait) when the last attention CTA finishes. The step still costs ~6 us per call at
// batch 1 (H200: 14.9 us with it, 8.8 us for the attention kernel alone at 8K). Combining in the last CTA of
// each pair instead (one launch, arrival counters) measured 0.73-0.95x the speed on every shape of the benchmark
// (docs/benchmarks.md), so the two kernels stay.
#include "backend/cuda/decode_attention.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hadamard_warp.cuh"
#include "backend/cuda/mma_fragments.cuh"
#include "backend/cuda/tile_formats.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <mutex>
#include <type_traits>

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 128, kWarps = 4, kMaxGroup = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kSubnormalScale = 16777216.0f;  // 2^24: a code c in the low bits of an fp16 is c * 2^-24

// (x0, x1) as an fp16 pair `hi` and the fp16 pair `lo` of what hi misses: hi + lo = x within ~2^-22 relative.
__device__ __forceinline__ void split_half2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x0, x1);
  const float2 back = __half22float2(h);
  const __half2 l = __floats2half2_rn(x0 - back.x, x1 - back.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// 2^x for x <= 0 in one MUFU op; exp2f adds a fix-up for results below 2^-126, weights too small to matter here.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct DecodeParams {
  const __half* q;
  const uint8_t* blocks;
  const __half* tails;
  const SequenceKvView* seqs;
  const int32_t* block_tables;
  float* partial_o;     // [num_seqs * num_q_heads][num_splits + 1][D]
  float2* partial_ml;   // [num_seqs * num_q_heads][num_splits + 1]
  int num_seqs, num_kv_heads, group, tiles_per_split, num_splits;
  float scale_log2;
  bool rotated;
};

// The fp16 tail (rotated like the tiles) of one (sequence, kv-head), fp32 FMA: at most G-1 tokens. Its key rows,
// then its value rows, are copied whole into shared memory (`ring`: G rows, then the scores) with cp.async, two
// round trips to memory instead of one per row and thread; 16-byte chunks swizzled as in fp16 tiles (chunk ^
// row & 7) so that the threads' row reads hit distinct banks.
template <class F>
__device__ void attend_tail(const DecodeParams& p, const SequenceKvView& seq, const float* qs, uint8_t* ring,
                            int head, size_t partial_row, int partial_index) {
  constexpr int D = F::D, G = F::G, kRowChunks = D / 8;
  const int n = seq.tail_len, tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
  const __half* k = p.tails + ((static_cast<size_t>(seq.tail_slot) * 2) * p.num_kv_heads + head) * G * D;
  const __half* v = k + static_cast<size_t>(p.num_kv_heads) * G * D;
  float* scores = reinterpret_cast<float*>(ring + G * D * 2);  // [head][token]
  auto stage_rows = [&](const __half* src) {
    for (int q = tid; q < n * kRowChunks; q += kThreads) {
      const int row = q / kRowChunks;
      cp_async_16(ring + 16 * (row * kRowChunks + ((q % kRowChunks) ^ (row & 7))), src + 8 * q);
    }
    cp_async_commit();
  };
  auto chunk = [&](int t, int c8) { return ring + 16 * (t * kRowChunks + (c8 ^ (t & 7))); };

  stage_rows(k);
  cp_async_wait<0>();
  __syncthreads();
  if (tid < n) {
    float acc[kMaxGroup] = {};
#pragma unroll 4
    for (int c8 = 0; c8 < kRowChunks; ++c8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(chunk(tid, c8));
      const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(h2[e]);
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h)
          if (h < p.group) acc[h] += qs[h * D + c8 * 8 + 2 * e] * f.x + qs[h * D + c8 * 8 + 2 * e + 1] * f.y;
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h)
      if (h < p.group) scores[h * G + tid] = acc[h] * p.scale_log2;
  }
  __syncthreads();  // the key rows are read: the value rows replace them while the softmax runs
  stage_rows(v);
  for (int h = warp; h < p.group; h += kWarps) {
    float m = -FLT_MAX;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, scores[h * G + t]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0;
    for (int t = lane; t < n; t += 32) {
      const float e = exp2_approx(scores[h * G + t] - m);
      scores[h * G + t] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) p.partial_ml[(partial_row + h) * (p.num_splits + 1) + partial_index] = make_float2(m, l);
  }
  cp_async_wait<0>();
  __syncthreads();
  for (int c = tid; c < D; c += kThreads) {
    float acc[kMaxGroup] = {};
#pragma unroll 4
    for (int t = 0; t < n; ++t) {
      const float x = __half2float(reinterpret_cast<const __half*>(chunk(t, c / 8))[c % 8]);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h)
        if (h < p.group) acc[h] += scores[h * G + t] * x;
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h)
      if (h < p.group) p.partial_o[((partial_row + h) * (p.num_splits + 1) + partial_index) * D + c] = acc[h];
  }
}

// Index of element i in a shared float array padded by 4 floats per 32, so that the 4 lanes of a fragment row
// (m = 0..3), which read 4-aligned runs 2 * NV or 16 floats apart, hit distinct banks.
__device__ __forceinline__ int padded(int i) { return i + 4 * (i / 32); }
constexpr int padded_size(int n) { return n + n / 8; }

// n consecutive floats from a 4n-byte aligned address (n = 2, 4, 8, 16) in 8- or 16-byte loads.
template <int N>
__device__ __forceinline__ void load_floats(const float* src, float (&out)[N]) {
  if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    out[0] = v.x, out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
    }
  }
}

// What tile CTA number `cta` (after the tail CTAs) reads: split `split` of the pair (sequence, kv-head) number
// cta / num_splits, its tiles [first_tile, end_tile).
struct CtaWork {
  SequenceKvView seq;
  int head, split, first_tile, end_tile;
  size_t partial_row;  // the partials of the group's first q head
};

__device__ __forceinline__ CtaWork cta_work(const DecodeParams& p, int cta) {
  CtaWork w;
  const int pair = cta / p.num_splits;
  w.split = cta % p.num_splits;
  w.head = pair % p.num_kv_heads;
  const int seq_index = pair / p.num_kv_heads;
  w.seq = p.seqs[seq_index];
  w.first_tile = w.split * p.tiles_per_split;
  w.end_tile = min(w.first_tile + p.tiles_per_split, w.seq.num_tiles);
  w.partial_row = static_cast<size_t>(seq_index) * p.num_kv_heads * p.group + w.head * p.group;
  return w;
}

// The group's queries, rotated into the storage space, as fp32 rows [kMaxGroup][D] (rows past the group zero).
template <int D>
__device__ void load_rotated_queries(const DecodeParams& p, size_t partial_row, float* qs) {
  constexpr int E = D / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int h = warp; h < kMaxGroup; h += kWarps) {
    float x[E] = {};
    if (h < p.group) {
      const __half* src = p.q + (partial_row + h) * D + lane * E;
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = __half2float(src[i]);
      if (p.rotated) hadamard_warp<D>(x);
    }
#pragma unroll
    for (int i = 0; i < E; ++i) qs[h * D + lane * E + i] = x[i];
  }
}

// The merge buffer in shared memory, [warp][head][D + 2]: each warp's o[D], m, l for the heads of the group.
template <int D>
__device__ __forceinline__ float* warp_state(uint8_t* shared, int warp, int head) {
  return reinterpret_cast<float*>(shared) + (warp * kMaxGroup + head) * (D + 2);
}

// After every warp has written its state (and a barrier): merges the 4 states and writes the CTA's partial.
template <int D>
__device__ void write_partial_from_warp_states(const DecodeParams& p, uint8_t* shared, size_t partial_row,
                                               int split) {
  for (int idx = threadIdx.x; idx < p.group * D; idx += kThreads) {
    const int h = idx / D, c = idx % D;
    float mx = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_state<D>(shared, w, h)[D]);
    float l = 0, acc = 0;
    for (int w = 0; w < kWarps; ++w) {
      const float* src = warp_state<D>(shared, w, h);
      const float f = exp2f(src[D] - mx);
      l += src[D + 1] * f;
      acc += src[c] * f;
    }
    const size_t slot = (partial_row + h) * (p.num_splits + 1) + split;
    p.partial_o[slot * D + c] = acc;
    if (c == 0) p.partial_ml[slot] = make_float2(mx, l);
  }
}

// Merges the 4 warps' softmax states (lane (g, m): head g, channels (2m + e) NV + i in o[i][e]; l over the
// lane's own tokens) through shared memory and writes the CTA's partial. Every warp of the CTA calls it.
template <int D>
__device__ void merge_warps_and_write_partial(const DecodeParams& p, uint8_t* shared, const float (&o)[D / 8][2],
                                              float m_run, float l_run, size_t partial_row, int split) {
  constexpr int NV = D / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (g < p.group) {
    float* dst = warp_state<D>(shared, warp, g);
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) dst[(2 * m4 + e) * NV + i] = o[i][e];
    if (m4 == 0) dst[D] = m_run, dst[D + 1] = l_run;
  }
  __syncthreads();
  write_partial_from_warp_states<D>(p, shared, partial_row, split);
}

// ---- fp16 tiles: the 4 warps share each tile ----

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

// ---- KVarN tiles: one warp per tile ----

// Shared memory of a KVarN CTA: each warp's two tile slots, then each warp's a_K and z_K of the tile being read
// as fp32 in k-slot order. The setup's queries, the tail CTAs' rows and scores and the final merge reuse the slots.
template <class F>
struct KvarnSharedLayout {
  static constexpr size_t query = 0;  // read into registers before the slots fill
  static constexpr size_t ring = std::max({size_t{2} * kWarps * F::L.bytes, sizeof(float) * kMaxGroup * F::D,
                                           sizeof(float) * kWarps * kMaxGroup * (F::D + 2)});
  static constexpr size_t key_scales = sizeof(float) * kWarps * 2 * F::D;
  static constexpr size_t bytes = ring + key_scales;
};

template <class F>
using SharedLayout = std::conditional_t<F::kCodes, KvarnSharedLayout<F>, Fp16SharedLayout<F>>;

// Per-token and per-channel scales of the tile being read, as fp32 over its dead key codes (padded()):
// s_tok_K[t] * 2^24 or 2^20 (even / odd token: the code's bit in its byte, see the scores), a_V[t], z_V[t], and
// s_ch_V[c] * 2^(24 - k) (k: the bit of channel c's code in its byte).
template <class F>
struct TileScales {
  static constexpr int s_tok = 0, a_v = padded_size(F::G), z_v = 2 * padded_size(F::G), s_ch = 3 * padded_size(F::G);
  static_assert(sizeof(float) * (s_ch + padded_size(F::D)) <= F::D * F::G / 2, "scales fit over the key codes");
};

// Value-code rows (token-major, D*VB/8 bytes each) are placed permuted: the lanes m = 0..3 of a fragment column
// read tokens 32 s + 8 m + u, rows a multiple of 8 apart that would share their banks. Row t moves to t ^ x and, in
// 64-byte rows, its 16-byte chunk c to c ^ (m & 2), where m = (t / 8) % 4 and x = m (rows <= 32 bytes) or m & 1.
template <class F>
struct ValueRows {
  static constexpr int kRowBytes = F::D * F::VB / 8, kGroupShift = 3;
  static constexpr int kColBytes = kRowBytes / 8;  // a fragment column's D/8 channels
  __device__ static int row_xor(int m) { return kRowBytes == 64 ? (m & 1) : (m & 3); }
  __device__ static int chunk_xor(int m) { return kRowBytes == 64 ? (m & 2) : 0; }
};

// One lane's share of copying a tile into a slot (chunks lane, lane + 32, ... of each region), with its shared-
// memory offsets computed once: key codes with their 16-byte chunks XOR-swizzled so that the 8 channel rows of an
// ldmatrix read hit distinct banks (chunk c of row r goes to c ^ (r / (rows per 128 bytes)) mod (chunks per row)),
// value codes in ValueRows order, scales as they are.
template <class F>
struct WarpTileCopy {
  static constexpr codec::TileLayout L = F::L;
  static constexpr int kKeyChunks = F::D * F::G / 32, kValueChunks = F::G * ValueRows<F>::kRowBytes / 16;
  static constexpr int kChunksPerRow = (ValueRows<F>::kRowBytes + 15) / 16, kRowsPerRound = 32 / kChunksPerRow;
  static_assert(L.key_codes == 0 && kKeyChunks % 32 == 0 && L.value_codes % 16 == 0);
  int lane, key_offset;
  // Offset of this lane's value chunk in a round whose rows' group m = t / (2 NT) is (lane_group + j) & 3.
  int value_offset[4];

  __device__ explicit WarpTileCopy(int lane_) : lane(lane_) {
    constexpr int kKeyRowChunks = F::G / 32;  // rows = lane / kKeyRowChunks + const: (row / (8 / kKeyRowChunks))
    const int chunk_k = lane % kKeyRowChunks;  // mod kKeyRowChunks = (lane / 8) mod kKeyRowChunks
    key_offset = 16 * (lane - chunk_k + (chunk_k ^ ((lane >> 3) & (kKeyRowChunks - 1))));
    const int t = lane / kChunksPerRow, chunk = lane % kChunksPerRow;
    const int lane_group = t >> ValueRows<F>::kGroupShift;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = (lane_group + j) & 3;
      value_offset[j] = 16 * lane + ((t ^ ValueRows<F>::row_xor(m)) - t) * ValueRows<F>::kRowBytes +
                        (((chunk ^ ValueRows<F>::chunk_xor(m)) - chunk) << 4);
    }
  }

  __device__ __forceinline__ void operator()(uint8_t* slot, const uint8_t* __restrict__ tile) const {
    const uint8_t* src = tile + 16 * lane;
#pragma unroll
    for (int k = 0; k < kKeyChunks / 32; ++k) cp_async_16(slot + key_offset + 512 * k, src + 512 * k);
#pragma unroll
    for (int k = 0; k < (kValueChunks + 31) / 32; ++k)
      if (kValueChunks % 32 == 0 || lane + 32 * k < kValueChunks)
        cp_async_16(slot + L.value_codes + value_offset[((kRowsPerRound * k) >> ValueRows<F>::kGroupShift) & 3] +
                        512 * k,
                    src + L.value_codes + 512 * k);
    copy_plain<static_cast<int>(L.key_scale), static_cast<int>(L.value_codes)>(slot, src);
    copy_plain<static_cast<int>(L.value_channel_scale), static_cast<int>(L.bytes)>(slot, src);
  }

  template <int kFrom, int kTo>  // byte range, multiples of 16
  __device__ __forceinline__ void copy_plain(uint8_t* slot, const uint8_t* src) const {
#pragma unroll
    for (int k = 0; k < (kTo - kFrom + 511) / 512; ++k)
      if ((kTo - kFrom) % 512 == 0 || kFrom / 16 + lane + 32 * k < kTo / 16)
        cp_async_16(slot + 16 * lane + kFrom + 512 * k, src + kFrom + 512 * k);
  }
};

// a_K, z_K of a tile as fp32 in fragment order: lane l writes, for k-block l / 4 and m = l % 4, its channels
// 16 kb + 2m, 2m + 1, 2m + 8, 2m + 9 (k-slots 2m, 2m + 1, 2m + 8, 2m + 9).
template <class F>
__device__ __forceinline__ void stage_key_scales(const uint8_t* tile, float* a_k, float* z_k, int lane) {
  if (lane < F::D / 4) {
    const __half2* ak = reinterpret_cast<const __half2*>(tile + F::L.key_scale);
    const __half2* zk = reinterpret_cast<const __half2*>(tile + F::L.key_zero);
    const int c2 = 8 * (lane / 4) + lane % 4;  // half2 index of channel 16 kb + 2m
    const float2 a0 = __half22float2(ak[c2]), a1 = __half22float2(ak[c2 + 4]);
    const float2 z0 = __half22float2(zk[c2]), z1 = __half22float2(zk[c2 + 4]);
    reinterpret_cast<float4*>(a_k)[lane] = make_float4(a0.x, a0.y, a1.x, a1.y);
    reinterpret_cast<float4*>(z_k)[lane] = make_float4(z0.x, z0.y, z1.x, z1.y);
  }
}

// The key codes of k-block kb through ldmatrix.trans (row address: this lane's key_base in the tile): w[h][s]
// holds channels 16 kb + 8h + 2m, + 1 (register halves) of tokens 32 s + 4 g .. + 3 (4 bits each).
template <class F>
__device__ __forceinline__ void load_key_codes(const uint8_t* row, int kb, uint32_t (&w)[2][F::G / 32]) {
  constexpr int kKeyRow = F::G / 2;
  if constexpr (F::G == 128) {
    ldmatrix_x4_trans(w[0], row + 16 * kb * kKeyRow);
    ldmatrix_x4_trans(w[1], row + (16 * kb + 8) * kKeyRow);
  } else {
    uint32_t x[4];
    ldmatrix_x4_trans(x, row + 16 * kb * kKeyRow);
    w[0][0] = x[0], w[0][1] = x[1], w[1][0] = x[2], w[1][1] = x[3];
  }
}

// This lane's ldmatrix row address in a tile's key codes (row lane % 8 of matrix lane / 8 = (channel half h,
// 32-token span s); G = 128: one ldmatrix per h, s = matrix; G = 64: one ldmatrix, (h, s) = (matrix / 2, % 2)).
template <class F>
__device__ __forceinline__ int key_row_offset(int lane) {
  constexpr int kKeyRowChunks = F::G / 32;
  const int r = lane % 8, h = F::G == 128 ? 0 : lane / 16, s = F::G == 128 ? lane / 8 : (lane / 8) % 2;
  return (8 * h + r) * (F::G / 2) + 16 * (s ^ ((r / (8 / kKeyRowChunks)) & (kKeyRowChunks - 1)));
}

// The tile's per-token and per-channel scales as fp32 (TileScales) over its key codes, once those are read.
template <class F>
__device__ __forceinline__ void stage_token_and_channel_scales(const uint8_t* tile, float* scales, int lane) {
  constexpr int kCodesPerByte = 8 / F::VB;
  auto stage = [&](size_t from, int to, int n, float even, float odd, bool by_channel) {
    if (4 * lane < n) {
      const uint2 raw = *reinterpret_cast<const uint2*>(tile + from + 8 * lane);
      const __half* h = reinterpret_cast<const __half*>(&raw);
      float4 f;
      float* x = &f.x;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = 4 * lane + j;
        const float factor = by_channel ? static_cast<float>(1 << (24 - (idx % kCodesPerByte) * F::VB))
                                        : ((idx & 1) ? odd : even);
        x[j] = __half2float(h[j]) * factor;
      }
      *reinterpret_cast<float4*>(scales + to + padded(4 * lane)) = f;
    }
  };
  stage(F::L.key_token_scale, TileScales<F>::s_tok, F::G, kSubnormalScale, kSubnormalScale / 16, false);
  stage(F::L.value_scale, TileScales<F>::a_v, F::G, 1.0f, 1.0f, false);
  stage(F::L.value_zero, TileScales<F>::z_v, F::G, 1.0f, 1.0f, false);
  stage(F::L.value_channel_scale, TileScales<F>::s_ch, F::D, 0, 0, true);
}

// Loads the group's rotated queries and returns, scaled to log2 units, q head `row`'s channels 16 kb + 2m, 2m + 1,
// 2m + 8, 2m + 9 (m = lane % 4; rows past the group are zero). The queries' space becomes the slots afterwards.
template <class F>
__device__ __forceinline__ void load_query_channels(const DecodeParams& p, const CtaWork& work, uint8_t* shared,
                                                    int row, float (&q)[F::D / 16][4]) {
  constexpr int D = F::D;
  float* qs = reinterpret_cast<float*>(shared + KvarnSharedLayout<F>::query);
  const int m4 = threadIdx.x % 4;
  load_rotated_queries<D>(p, work.partial_row, qs);
  __syncthreads();
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb)
#pragma unroll
    for (int i = 0; i < 4; ++i) q[kb][i] = qs[row * D + 16 * kb + 2 * m4 + (i & 1) + 8 * (i >> 1)] * p.scale_log2;
  __syncthreads();
}

// Offsets of this lane's value codes in a slot: token 32 s + 8 m + 4 e + u (u = 0..3), fragment column g's bytes,
// at value_base[e][u] + 32 s * row bytes (ValueRows order).
template <class F>
__device__ __forceinline__ void value_code_offsets(int lane, int (&value_base)[2][4]) {
  using Rows = ValueRows<F>;
  const int g = (lane & 31) / 4, m4 = lane % 4, col_bytes = g * Rows::kColBytes;
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int u = 0; u < 4; ++u)
      value_base[e][u] = F::L.value_codes + (8 * m4 + 4 * e + (u ^ Rows::row_xor(m4))) * Rows::kRowBytes +
                         (((col_bytes >> 4) ^ Rows::chunk_xor(m4)) << 4) + (col_bytes & 15);
}

// One lane's q' a_K of k-block kb at its channels 2m, 2m + 1 (pair 0) and 2m + 8, 2m + 9 (pair 1) as fp16 hi and lo
// pairs; adds their q' z_K to z_sum. a_k, z_k: the tile's, staged by stage_key_scales.
__device__ __forceinline__ void fold_key_scales(const float (&q)[4], const float* a_k, const float* z_k, int kb,
                                                float& z_sum, uint32_t (&hi)[2], uint32_t (&lo)[2]) {
  const int m4 = threadIdx.x % 4;
  const float4 av = reinterpret_cast<const float4*>(a_k)[4 * kb + m4];
  const float4 zv = reinterpret_cast<const float4*>(z_k)[4 * kb + m4];
  z_sum += q[0] * zv.x + q[1] * zv.y + q[2] * zv.z + q[3] * zv.w;
  split_half2(q[0] * av.x, q[1] * av.y, hi[0], lo[0]);
  split_half2(q[2] * av.z, q[3] * av.w, hi[1], lo[1]);
}

// Runs body(tile, it, a_k, z_k) over this warp's tiles of the CTA's split (tiles w, w + 4, ... for warp w), each
// whole in one of the warp's two shared-memory slots while the next streams in, its a_K and z_K staged; then waits
// for every warp (the slots become the merge buffer).
template <class F, class Body>
__device__ __forceinline__ void for_each_warp_tile(const DecodeParams& p, const CtaWork& work, uint8_t* shared,
                                                   Body&& body) {
  constexpr codec::TileLayout L = F::L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int32_t* table = p.block_tables + work.seq.block_table_offset;
  const int num = work.end_tile - work.first_tile;
  const int mine = num > warp ? (num - warp + kWarps - 1) / kWarps : 0;
  uint8_t* slots = shared + warp * 2 * L.bytes;
  float* a_k = reinterpret_cast<float*>(shared + KvarnSharedLayout<F>::ring) + warp * 2 * F::D;
  float* z_k = a_k + F::D;
  auto tile_bytes = [&](int i) {
    return p.blocks +
           (static_cast<size_t>(table[work.first_tile + warp + i * kWarps]) * p.num_kv_heads + work.head) * L.bytes;
  };
  const WarpTileCopy<F> copy_tile(lane);
  if (mine > 0) copy_tile(slots, tile_bytes(0));
  cp_async_commit();
  for (int it = 0; it < mine; ++it) {
    if (it + 1 < mine) copy_tile(slots + ((it + 1) & 1) * L.bytes, tile_bytes(it + 1));
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    uint8_t* tile = slots + (it & 1) * L.bytes;
    stage_key_scales<F>(tile, a_k, z_k, lane);
    __syncwarp();
    body(tile, it, a_k, z_k);
    __syncwarp();  // the slot is refilled in the next iteration
  }
  cp_async_wait<0>();
  __syncthreads();
}

// One warp reads whole tiles: warp w of the CTA takes tiles w, w + 4, ... of its split through its own two-slot
// cp.async ring, so that nothing but a warp barrier separates the tiles, and the per-tile and per-channel work
// (folding a_K into the query, the scales, the values' epilogue) is paid once per 128 tokens.
// Lane (g, m) = (lane / 4, lane % 4) owns q head g (rows g: fp16 high part, g + 8: low part) and fragment
// columns 2m, 2m + 1 of every n-tile. Keys: k-slot i of k-block kb is channel 16 kb + i; column x of score n-tile
// j = 4 s + q is token 32 s + 4 x + q. ldmatrix.trans of 8 channel rows x 16 bytes (32 tokens) gives a lane the
// 16-bit groups x = g of channels 2m and 2m + 1 in the two halves of a register: the 4 codes of tokens 32 s + 4 g
// + q, q = 0..3, at bits 4q, a B operand after one mask (q = 0, 1) or a shift and a mask (q = 2, 3). Values: k-step
// kk takes the score n-tiles 2kk, 2kk + 1 as its k-slots; column x of value n-tile i is channel x NV + i.
template <class F>
__device__ __forceinline__ void attend_kvarn_tiles(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  constexpr int D = F::D, G = F::G, VB = F::VB, NT = G / 8, KBLK = D / 16, KK = G / 16, NV = D / 8;
  constexpr int kCodesPerByte = 8 / VB;
  using Rows = ValueRows<F>;
  using Scales = TileScales<F>;
  const int lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  float q[KBLK][4];  // head g's channels
  load_query_channels<F>(p, work, shared, g, q);
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);

  float o[NV][2] = {};  // head g, channels (2m + e) NV + i
  float m_run = -FLT_MAX, l_run = 0;
  for_each_warp_tile<F>(p, work, shared, [&](uint8_t* tile, int it, const float* a_k, const float* z_k) {
    // ---- scores: A = q' a_K (hi / lo), B = key codes as fp16 subnormals code * 2^k * 2^-24 ----
    float acc[NT][4] = {};
    float z_sum = 0;  // sum_c q'_c z_K[c] over this lane's channels
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      uint32_t hi[2], lo[2];
      fold_key_scales(q[kb], a_k, z_k, kb, z_sum, hi, lo);
      const uint32_t a[4] = {hi[0], lo[0], hi[1], lo[1]};  // rows g: hi, g + 8: lo
      uint32_t w[2][G / 32];  // [channel half][token span]
      load_key_codes<F>(tile + key_base, kb, w);
#pragma unroll
      for (int span = 0; span < G / 32; ++span) {
        const uint32_t x0 = w[0][span], x1 = w[1][span], y0 = x0 >> 8, y1 = x1 >> 8;
        mma_m16n8k16_rows16(acc[4 * span], a, x0 & 0x000f000fu, x1 & 0x000f000fu);
        mma_m16n8k16_rows16(acc[4 * span + 1], a, x0 & 0x00f000f0u, x1 & 0x00f000f0u);
        mma_m16n8k16_rows16(acc[4 * span + 2], a, y0 & 0x000f000fu, y1 & 0x000f000fu);
        mma_m16n8k16_rows16(acc[4 * span + 3], a, y0 & 0x00f000f0u, y1 & 0x00f000f0u);
      }
    }
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);

    __syncwarp();  // the key codes are read: the scales replace them
    float* scales = reinterpret_cast<float*>(const_cast<uint8_t*>(tile));
    stage_token_and_channel_scales<F>(tile, scales, lane);
    __syncwarp();

    // ---- scores in log2 units, relative to the running maximum: s_tok (acc_hi + acc_lo + z / 2^k') - m with
    // 2^k' folded into the staged s_tok (the first tile is taken relative to 0) ----
    const float reference = it == 0 ? 0.0f : m_run;
    float s[NT][2];
    {
      const float z_even = z_sum / kSubnormalScale, z_odd = z_sum * (16.0f / kSubnormalScale);
#pragma unroll
      for (int span = 0; span < G / 32; ++span)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float s_tok[4];  // tokens 32 span + 8 m + 4 e + q
          load_floats(scales + Scales::s_tok + padded(32 * span + 8 * m4 + 4 * e), s_tok);
#pragma unroll
          for (int q2 = 0; q2 < 4; ++q2) {
            const int j = 4 * span + q2;
            s[j][e] = fmaf(s_tok[q2], (acc[j][e] + acc[j][e + 2]) + ((q2 & 1) ? z_odd : z_even), -reference);
          }
        }
    }

    // ---- online softmax over the tile: the reference moves only for the first tile or a new maximum ----
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < NT; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][0], s[j][1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    if (__any_sync(0xffffffffu, it == 0 || tile_max > 0)) {
      const float shift = it == 0 ? tile_max : fmaxf(tile_max, 0.0f);
      const float correction = it == 0 ? 0.0f : exp2_approx(-shift);
      m_run = reference + shift;
      l_run *= correction;
#pragma unroll
      for (int i = 0; i < NV; ++i) o[i][0] *= correction, o[i][1] *= correction;
#pragma unroll
      for (int j = 0; j < NT; ++j) s[j][0] -= shift, s[j][1] -= shift;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = exp2_approx(s[j][e]);
        l_run += s[j][e];
      }

    // ---- values: A = p a_V (hi / lo), B = value codes as fp16 subnormals; accumulated over the whole tile ----
    float c[NV][4] = {};
    float pz = 0;  // sum_t p_t z_V[t] over this lane's tokens
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      float pa[2][2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = padded(32 * (kk / 2) + 8 * m4 + 4 * e + 2 * (kk % 2));
        const float2 av = *reinterpret_cast<const float2*>(scales + Scales::a_v + t);
        const float2 zv = *reinterpret_cast<const float2*>(scales + Scales::z_v + t);
        pa[0][e] = s[2 * kk][e] * av.x;
        pa[1][e] = s[2 * kk + 1][e] * av.y;
        pz += s[2 * kk][e] * zv.x + s[2 * kk + 1][e] * zv.y;
      }
      uint32_t a[4];
      split_half2(pa[0][0], pa[0][1], a[0], a[1]);
      split_half2(pa[1][0], pa[1][1], a[2], a[3]);
      // Code words of tokens 32 (kk / 2) + 8 m + 4 e + 2 (kk % 2) + jj, this column's bytes.
      constexpr int kWords = (Rows::kColBytes + 3) / 4;
      uint32_t v[2][2][kWords];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const uint8_t* src = tile + value_base[e][2 * (kk % 2) + jj] + (kk / 2) * 32 * Rows::kRowBytes;
          if constexpr (Rows::kColBytes == 2) {
            v[jj][e][0] = *reinterpret_cast<const uint16_t*>(src);
          } else if constexpr (Rows::kColBytes == 4) {
            v[jj][e][0] = *reinterpret_cast<const uint32_t*>(src);
          } else {
            const uint2 x = *reinterpret_cast<const uint2*>(src);
            v[jj][e][0] = x.x, v[jj][e][1] = x.y;
          }
        }
#pragma unroll
      for (int byte_group = 0; byte_group < NV / kCodesPerByte; ++byte_group) {
        const uint32_t sel = pair_selector(byte_group % 4);
        const uint32_t x_ab = __byte_perm(v[0][0][byte_group / 4], v[0][1][byte_group / 4], sel);
        const uint32_t x_cd = __byte_perm(v[1][0][byte_group / 4], v[1][1][byte_group / 4], sel);
#pragma unroll
        for (int q2 = 0; q2 < kCodesPerByte; ++q2) {
          const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << (q2 * VB);
          mma_m16n8k16_rows16(c[byte_group * kCodesPerByte + q2], a, x_ab & mask, x_cd & mask);
        }
      }
    }
    pz += __shfl_xor_sync(0xffffffffu, pz, 1);
    pz += __shfl_xor_sync(0xffffffffu, pz, 2);
    {
      float pz_k[kCodesPerByte];  // pz in the units of a code at bit k: 2^(k - 24)
#pragma unroll
      for (int q2 = 0; q2 < kCodesPerByte; ++q2) pz_k[q2] = pz * (static_cast<float>(1 << (q2 * VB)) / kSubnormalScale);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float s_ch[NV];
        load_floats(scales + Scales::s_ch + padded((2 * m4 + e) * NV), s_ch);
#pragma unroll
        for (int i = 0; i < NV; ++i) o[i][e] = fmaf(s_ch[i], (c[i][e] + c[i][e + 2]) + pz_k[i % kCodesPerByte], o[i][e]);
      }
    }
  });
  merge_warps_and_write_partial<D>(p, shared, o, m_run, l_run, work.partial_row, work.split);
}

// KVarN tiles for groups of at most 4 q heads (Llama's 32 / 8): the same reading of whole tiles per warp with the
// products transposed, tokens (scores) or channels (values) as the mma's 16 rows and the group's heads x (hi, lo)
// as its 8 columns, so that no mma row and no lane works for a head that does not exist (with the heads as rows,
// half of both would). Lane (g, m) = (lane / 4, lane % 4): B column g = head g / 2, part g % 2 (hi, lo); C columns
// 2m, 2m + 1 = head m, hi and lo, so a lane's results are head m's and a score is c0 + c1.
// Scores S^T = K q': k-slot i of k-block kb is channel 16 kb + i (as in attend_kvarn_tiles); m-tile (span pair sp,
// q): row r < 8 is token 64 sp + 4 r + q, row r + 8 is token 64 sp + 32 + 4 r + q; the A operand is the codes read
// with ldmatrix.trans. Values O^T = V^T P^T: k-step = score m-tile (its 16 tokens as k-slots), P^T moved from the
// scores' C layout into the B layout by movmatrix (an 8 x 8 transpose, hi and lo as the column pair); rows g and
// g + 8 of value m-tile (j, q') are channels g NV + (2j) kCPB + q' and g NV + (2j + 1) kCPB + q' (fragment column g
// of the value rows, bytes 2j and 2j + 1, code q' of each).
template <class F>
__device__ __forceinline__ void attend_kvarn_tiles_few_heads(const DecodeParams& p, const CtaWork& work,
                                                             uint8_t* shared) {
  constexpr int D = F::D, G = F::G, VB = F::VB, KBLK = D / 16, NV = D / 8;
  constexpr int kSpanPairs = G / 64, kMTiles = 4 * kSpanPairs;  // score m-tiles = value k-steps
  constexpr int kCodesPerByte = 8 / VB, kColBytes = ValueRows<F>::kColBytes;
  constexpr int kVTiles = NV / 2;  // value m-tiles
  using Rows = ValueRows<F>;
  using Scales = TileScales<F>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  float q[KBLK][4];  // head g / 2's channels
  load_query_channels<F>(p, work, shared, g / 2, q);
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);

  float o[NV] = {};  // head m, channels g NV + c
  float m_run = -FLT_MAX, l_run = 0;
  for_each_warp_tile<F>(p, work, shared, [&](uint8_t* tile, int it, const float* a_k, const float* z_k) {
    // ---- scores: A = key codes (fp16 subnormals), B = q' a_K, this lane's column's part (hi or lo) ----
    float acc[kMTiles][4] = {};
    float z_sum = 0;  // sum_c q'_c z_K[c] of head g / 2 over this lane's channels
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      uint32_t hi[2], lo[2];
      fold_key_scales(q[kb], a_k, z_k, kb, z_sum, hi, lo);
      const uint32_t b0 = (g & 1) ? lo[0] : hi[0], b1 = (g & 1) ? lo[1] : hi[1];
      uint32_t w[2][G / 32];  // [channel half][token span]
      load_key_codes<F>(tile + key_base, kb, w);
#pragma unroll
      for (int sp = 0; sp < kSpanPairs; ++sp)
#pragma unroll
        for (int q2 = 0; q2 < 4; ++q2) {
          const int shift = q2 < 2 ? 0 : 8;
          const uint32_t mask = (q2 & 1) ? 0x00f000f0u : 0x000f000fu;
          const uint32_t a[4] = {(w[0][2 * sp] >> shift) & mask, (w[0][2 * sp + 1] >> shift) & mask,
                                 (w[1][2 * sp] >> shift) & mask, (w[1][2 * sp + 1] >> shift) & mask};
          mma_m16n8k16_rows16(acc[4 * sp + q2], a, b0, b1);
        }
    }
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);
    z_sum = __shfl_sync(0xffffffffu, z_sum, 8 * m4);  // head m's: lane (2m, 0)

    __syncwarp();  // the key codes are read: the scales replace them
    float* scales = reinterpret_cast<float*>(const_cast<uint8_t*>(tile));
    stage_token_and_channel_scales<F>(tile, scales, lane);
    __syncwarp();

    // ---- scores of head m, tokens 32 s + 4 g + q, relative to the running maximum ----
    const float reference = it == 0 ? 0.0f : m_run;
    float s[kMTiles][2];  // [m-tile][row g, row g + 8]
    {
      const float z_even = z_sum / kSubnormalScale, z_odd = z_sum * (16.0f / kSubnormalScale);
#pragma unroll
      for (int sp = 0; sp < kSpanPairs; ++sp)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float s_tok[4];
          load_floats(scales + Scales::s_tok + padded(32 * (2 * sp + r) + 4 * g), s_tok);
#pragma unroll
          for (int q2 = 0; q2 < 4; ++q2) {
            const float* c = acc[4 * sp + q2] + 2 * r;
            s[4 * sp + q2][r] = fmaf(s_tok[q2], (c[0] + c[1]) + ((q2 & 1) ? z_odd : z_even), -reference);
          }
        }
    }

    // ---- online softmax of head m over the tile (the 8 lanes of column pair m) ----
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][0], s[j][1]));
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 *= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o2));
    if (__any_sync(0xffffffffu, it == 0 || tile_max > 0)) {
      const float shift = it == 0 ? tile_max : fmaxf(tile_max, 0.0f);
      const float correction = it == 0 ? 0.0f : exp2_approx(-shift);
      m_run = reference + shift;
      l_run *= correction;
#pragma unroll
      for (int c = 0; c < NV; ++c) o[c] *= correction;
#pragma unroll
      for (int j = 0; j < kMTiles; ++j) s[j][0] -= shift, s[j][1] -= shift;
    }
#pragma unroll
    for (int j = 0; j < kMTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        s[j][r] = exp2_approx(s[j][r]);
        l_run += s[j][r];
      }

    // ---- values: A = value codes (fp16 subnormals), B = (p a_V)^T hi / lo by movmatrix ----
    float c[kVTiles][4] = {};
    float pz = 0;  // sum_t p_t z_V[t] of head m over this lane's tokens
#pragma unroll
    for (int sp = 0; sp < kSpanPairs; ++sp) {
      float a_v[2][4], z_v[2][4];  // tokens 32 (2 sp + r) + 4 g + q
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        load_floats(scales + Scales::a_v + padded(32 * (2 * sp + r) + 4 * g), a_v[r]);
        load_floats(scales + Scales::z_v + padded(32 * (2 * sp + r) + 4 * g), z_v[r]);
      }
#pragma unroll
      for (int q2 = 0; q2 < 4; ++q2) {
        const int kk = 4 * sp + q2;
        uint32_t b[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          pz += s[kk][r] * z_v[r][q2];
          const float x = s[kk][r] * a_v[r][q2];
          const __half hi = __float2half_rn(x);
          const __half2 hl = __halves2half2(hi, __float2half_rn(x - __half2float(hi)));
          b[r] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(&hl));
        }
        // Code words of tokens 32 (2 sp + r) + 8 m + 4 e + q (k-slots 2m + e of row half r), column g's bytes.
        constexpr int kWords = (kColBytes + 3) / 4;
        uint32_t v[2][2][kWords];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint8_t* src = tile + value_base[e][q2] + 32 * (2 * sp + r) * Rows::kRowBytes;
            if constexpr (kColBytes == 2) {
              v[r][e][0] = *reinterpret_cast<const uint16_t*>(src);
            } else if constexpr (kColBytes == 4) {
              v[r][e][0] = *reinterpret_cast<const uint32_t*>(src);
            } else {
              const uint2 x2 = *reinterpret_cast<const uint2*>(src);
              v[r][e][0] = x2.x, v[r][e][1] = x2.y;
            }
          }
#pragma unroll
        for (int j = 0; j < kColBytes / 2; ++j) {
          const int byte0 = 2 * j, byte1 = 2 * j + 1;
          const uint32_t x0a = __byte_perm(v[0][0][byte0 / 4], v[0][1][byte0 / 4], pair_selector(byte0 % 4));
          const uint32_t x0b = __byte_perm(v[0][0][byte1 / 4], v[0][1][byte1 / 4], pair_selector(byte1 % 4));
          const uint32_t x1a = __byte_perm(v[1][0][byte0 / 4], v[1][1][byte0 / 4], pair_selector(byte0 % 4));
          const uint32_t x1b = __byte_perm(v[1][0][byte1 / 4], v[1][1][byte1 / 4], pair_selector(byte1 % 4));
#pragma unroll
          for (int q3 = 0; q3 < kCodesPerByte; ++q3) {
            const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << (q3 * VB);
            const uint32_t a[4] = {x0a & mask, x0b & mask, x1a & mask, x1b & mask};
            mma_m16n8k16_rows16(c[j * kCodesPerByte + q3], a, b[0], b[1]);
          }
        }
      }
    }
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 *= 2) pz += __shfl_xor_sync(0xffffffffu, pz, o2);
    {
      float pz_k[kCodesPerByte];  // pz in the units of a code at bit k: 2^(k - 24)
#pragma unroll
      for (int q3 = 0; q3 < kCodesPerByte; ++q3) pz_k[q3] = pz * (static_cast<float>(1 << (q3 * VB)) / kSubnormalScale);
      float s_ch[NV];
      load_floats(scales + Scales::s_ch + padded(g * NV), s_ch);
#pragma unroll
      for (int j = 0; j < kColBytes / 2; ++j)
#pragma unroll
        for (int q3 = 0; q3 < kCodesPerByte; ++q3) {
          const float* cc = c[j * kCodesPerByte + q3];
          const int ca = 2 * j * kCodesPerByte + q3, cb = ca + kCodesPerByte;
          o[ca] = fmaf(s_ch[ca], (cc[0] + cc[1]) + pz_k[q3], o[ca]);
          o[cb] = fmaf(s_ch[cb], (cc[2] + cc[3]) + pz_k[q3], o[cb]);
        }
    }
  });
#pragma unroll
  for (int o2 = 4; o2 < 32; o2 *= 2) l_run += __shfl_xor_sync(0xffffffffu, l_run, o2);
  if (m4 < p.group) {
    float* dst = warp_state<D>(shared, warp, m4);
#pragma unroll
    for (int c2 = 0; c2 < NV; ++c2) dst[g * NV + c2] = o[c2];
    if (g == 0) dst[D] = m_run, dst[D + 1] = l_run;
  }
  __syncthreads();
  write_partial_from_warp_states<D>(p, shared, work.partial_row, work.split);
}

// Shared memory of a tail CTA: attend_tail's rows and scores, then the group's rotated queries.
template <class F>
struct TailSharedLayout {
  static constexpr size_t query = size_t{2} * F::G * F::D + sizeof(float) * kMaxGroup * F::G;
  static constexpr size_t bytes = query + sizeof(float) * kMaxGroup * F::D;
};

template <class F>
constexpr size_t shared_bytes() {
  return std::max(TailSharedLayout<F>::bytes, SharedLayout<F>::bytes);
}

template <class F>
__global__ void __launch_bounds__(kThreads, F::kCodes ? 2 : 1) decode_attention_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) uint8_t shared[];
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may launch once every CTA has started
#endif
  const int pairs = p.num_seqs * p.num_kv_heads;
  if (static_cast<int>(blockIdx.x) < pairs) {
    const int head = blockIdx.x % p.num_kv_heads, seq_index = blockIdx.x / p.num_kv_heads;
    const SequenceKvView seq = p.seqs[seq_index];
    if (seq.tail_len == 0) return;
    const size_t partial_row = static_cast<size_t>(seq_index) * p.num_kv_heads * p.group + head * p.group;
    float* qs = reinterpret_cast<float*>(shared + TailSharedLayout<F>::query);
    load_rotated_queries<F::D>(p, partial_row, qs);
    __syncthreads();
    attend_tail<F>(p, seq, qs, shared, head, partial_row, p.num_splits);
    return;
  }
  const CtaWork work = cta_work(p, blockIdx.x - pairs);
  if (work.first_tile >= work.end_tile) return;
  if constexpr (F::kCodes) {
    if (p.group <= 4)
      attend_kvarn_tiles_few_heads<F>(p, work, shared);
    else
      attend_kvarn_tiles<F>(p, work, shared);
  } else {
    attend_fp16_tiles<F>(p, work, shared);
  }
}

template <int D>
__global__ void decode_combine_kernel(const float* __restrict__ partial_o, const float2* __restrict__ partial_ml,
                                      const SequenceKvView* __restrict__ seqs, int num_q_heads, int tiles_per_split,
                                      int num_splits, int num_rows, bool rotated, __half* __restrict__ out) {
  constexpr int E = D / 32;
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x & 31;
  if (row >= num_rows) return;
  const SequenceKvView seq = seqs[row / num_q_heads];
  const int used = (seq.num_tiles + tiles_per_split - 1) / tiles_per_split;
  const int parts = used + (seq.tail_len > 0);  // part `used` is the tail's, stored at index num_splits
  const size_t base = static_cast<size_t>(row) * (num_splits + 1);
  auto slot = [&](int part) { return base + (part < used ? part : num_splits); };
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the attention grid has finished and its writes are visible
#endif
  float mx = -FLT_MAX;
  for (int i = lane; i < parts; i += 32) mx = fmaxf(mx, partial_ml[slot(i)].x);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float l = 0, acc[E] = {};
  for (int i = lane; i < parts; i += 32) {
    const float2 ml = partial_ml[slot(i)];
    l += ml.y * exp2f(ml.x - mx);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll 4
  for (int i = 0; i < parts; ++i) {
    const size_t s = slot(i);
    const float f = exp2f(partial_ml[s].x - mx);
    float x[E];
    load_floats(partial_o + s * D + lane * E, x);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += x[e] * f;
  }
  const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] *= inv;
  if (rotated) hadamard_warp<D>(acc);
#pragma unroll
  for (int i = 0; i < E; ++i) out[static_cast<size_t>(row) * D + lane * E + i] = __float2half_rn(acc[i]);
}

// The current device's properties the launches depend on, read once.
struct DeviceTraits {
  int multiprocessors = 0;
  bool programmatic_launch = false;  // griddepcontrol (programmatic dependent launch): compute capability >= 9.0
};

const DeviceTraits& device_traits() {
  static const DeviceTraits traits = [] {
    int device = 0, sms = 0, major = 0;
    KVARN_CUDA_CHECK(cudaGetDevice(&device));
    KVARN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KVARN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return DeviceTraits{sms, major >= 9};
  }();
  return traits;
}

template <class F>
int blocks_per_sm() {
  static std::once_flag once;
  static int blocks = 0;
  std::call_once(once, [] {
    KVARN_CUDA_CHECK(cudaFuncSetAttribute(decode_attention_kernel<F>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          shared_bytes<F>()));
    KVARN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_attention_kernel<F>, kThreads,
                                                                   shared_bytes<F>()));
  });
  return std::max(blocks, 1);
}

}  // namespace

DecodeAttentionPlan plan_decode_attention(const KvCacheLayer& cache, int num_seqs, int num_q_heads, int max_tiles) {
  DecodeAttentionPlan plan;
  int per_sm = 1;
  with_tile_format(cache, "decode_attention", [&](auto f) { per_sm = blocks_per_sm<decltype(f)>(); });
  const int tiles_at_once = cache.layout.code_tile ? kWarps : 1;  // KVarN CTAs read one tile per warp
  // Split-K over tiles. CTAs of equal length run in waves of (SMs x CTAs per SM), and a last wave that is only
  // partly full costs much of a whole one (a CTA's pace is set by its own instruction latencies more than by
  // memory, so the CTAs of a thin wave run only a little faster). Choose the split that minimizes waves x (tiles per
  // CTA, divided by the tiles a CTA reads at once, + ~2 tiles of per-CTA start and merge); the tail CTAs are short
  // and run first, so they are left out.
  // Measured on the H100 (k4v2_g128, batch 8-128, 8K-32K): the old rule, "two waves", left 2.1-2.6 waves and ran
  // up to 1.12x slower.
  constexpr double kCtaOverheadTiles = 2.0;
  const long slots = static_cast<long>(device_traits().multiprocessors) * per_sm;
  const long pairs = std::max(1L, static_cast<long>(num_seqs) * cache.num_kv_heads);
  plan.tiles_per_split = std::max(1, max_tiles);
  double best = -1;
  const long most_splits = std::min<long>(max_tiles, std::max(16L, 8 * slots / pairs));
  for (long splits = 1; splits <= most_splits; ++splits) {
    const long per_split = (max_tiles + splits - 1) / splits;
    const long used = (max_tiles + per_split - 1) / per_split;
    const double cost = static_cast<double>((pairs * used + slots - 1) / slots) *
                        (static_cast<double>((per_split + tiles_at_once - 1) / tiles_at_once) + kCtaOverheadTiles);
    if (best < 0 || cost < best) best = cost, plan.tiles_per_split = static_cast<int>(per_split);
  }
  plan.num_splits = (max_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  const size_t rows = static_cast<size_t>(num_seqs) * num_q_heads * (plan.num_splits + 1);
  plan.workspace_bytes = rows * (sizeof(float) * cache.head_dim() + sizeof(float2));
  return plan;
}

void decode_attention(const KvCacheLayer& cache, const DecodeAttentionArgs& args, const DecodeAttentionPlan& plan,
                      void* workspace, cudaStream_t stream) {
  if (args.num_seqs == 0) return;
  if (args.num_q_heads % cache.num_kv_heads != 0 || args.num_q_heads / cache.num_kv_heads > kMaxGroup)
    throw_error("decode_attention: " + std::to_string(args.num_q_heads) + " q heads over " +
                std::to_string(cache.num_kv_heads) + " kv heads; expected a multiple with at most 8 per kv head");
  const long ctas = static_cast<long>(args.num_seqs) * cache.num_kv_heads * (plan.num_splits + 1);
  if (ctas > 0x7fffffffL)
    throw_error("decode_attention: " + std::to_string(ctas) + " CTAs exceed the grid limit (2^31 - 1)");
  const int d = cache.head_dim();
  const size_t rows = static_cast<size_t>(args.num_seqs) * args.num_q_heads * (plan.num_splits + 1);
  DecodeParams p;
  p.q = reinterpret_cast<const __half*>(args.q);
  p.blocks = cache.blocks;
  p.tails = reinterpret_cast<const __half*>(cache.tails);
  p.seqs = args.seqs;
  p.block_tables = args.block_tables;
  p.partial_o = static_cast<float*>(workspace);
  p.partial_ml = reinterpret_cast<float2*>(p.partial_o + rows * d);
  p.num_seqs = args.num_seqs;
  p.num_kv_heads = cache.num_kv_heads;
  p.group = args.num_q_heads / cache.num_kv_heads;
  p.tiles_per_split = plan.tiles_per_split;
  p.num_splits = plan.num_splits;
  p.scale_log2 = args.scale * kLog2e;
  p.rotated = cache.rotated();
  with_tile_format(cache, "decode_attention", [&](auto f) {
    using F = decltype(f);
    blocks_per_sm<F>();  // sets the kernel's shared-memory limit once
    decode_attention_kernel<F><<<static_cast<unsigned>(ctas), kThreads, shared_bytes<F>(), stream>>>(p);
  });
  KVARN_CUDA_CHECK(cudaGetLastError());
  const int num_rows = args.num_seqs * args.num_q_heads;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((num_rows * 32 + 255) / 256);
  config.blockDim = dim3(256);
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (device_traits().programmatic_launch) config.attrs = &attribute, config.numAttrs = 1;
  auto* out = reinterpret_cast<__half*>(args.out);
  KVARN_CUDA_CHECK(cudaLaunchKernelEx(&config, d == 128 ? decode_combine_kernel<128> : decode_combine_kernel<64>,
                                      static_cast<const float*>(p.partial_o),
                                      static_cast<const float2*>(p.partial_ml), args.seqs, args.num_q_heads,
                                      plan.tiles_per_split, plan.num_splits, num_rows, cache.rotated(), out));
}

}  // namespace kvarn::cuda
