// Decode attention, the parts every CTA kind uses: launch parameters, the CTA's work, the group's rotated queries,
// the merge of softmax states, and small numeric helpers.
#pragma once
#include "backend/cuda/exp2_approx.cuh"
#include "backend/cuda/hadamard_warp.cuh"
#include "backend/cuda/kv_layout.h"
#include "backend/cuda/mma_fragments.cuh"
#include "backend/cuda/programmatic_launch.cuh"
#include "codec/tile_layout.h"

#include <cuda_fp16.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

namespace kvarn::cuda::decode {

// kMaxGroup: the q heads of a block (head_blocks): an fp16 CTA's and a tail CTA's mma rows hold 8 heads and the
// rest of their rounding. kMaxTileGroup: the most q heads a KVarN tile CTA serves from one read of a tile (the heads
// as the mma's 16 rows: attend_kvarn_tiles_wide).
constexpr int kThreads = 128, kWarps = 4, kMaxGroup = 8, kMaxTileGroup = 16;
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

struct DecodeParams {
  const __half* q;
  const uint8_t* blocks;
  const __half* tails;
  const SequenceKvView* seqs;
  const int32_t* block_tables;
  float* partial_o;     // [num_seqs * num_q_heads][num_splits + 1][D]
  float2* partial_ml;   // [num_seqs * num_q_heads][num_splits + 1]
  __half* out;          // [num_seqs * num_q_heads][D], written here only where tails_in_tile_ctas
  int num_seqs, num_kv_heads, tiles_per_split, num_splits;
  // A kv head's q heads are served in head_blocks blocks of `group` (<= kMaxGroup) heads, each block a pair of its
  // own (sequence, kv-head block) for the tail CTAs; a tile CTA serves tile_blocks of them (<= kMaxTileGroup heads,
  // a divisor of head_blocks), its pair the (sequence, run of tile_blocks blocks).
  int group, head_blocks, tile_blocks;
  int first_wave_ctas;  // CTAs resident at the launch (SMs x CTAs per SM): they ask for their first tiles at once
  float scale_log2;
  bool rotated;
  bool tails_in_tile_ctas;  // no tail CTAs: each pair's one tile CTA reads its tail (decode_attention_kernel)
};

// Index of element i in a shared float array padded by 4 floats per 32, so that the 4 lanes of a fragment row
// (m = 0..3), which read 4-aligned runs 8, 16 or 2 * NV floats apart, hit distinct banks.
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

// n floats to a 4n-byte aligned address (n = 2, 4, 8, 16) in 8- or 16-byte stores.
template <int N>
__device__ __forceinline__ void store_floats(float* dst, const float (&x)[N]) {
  if constexpr (N == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(x[0], x[1]);
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
      reinterpret_cast<float4*>(dst)[i] = make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
  }
}

// What tile CTA number `cta` (after the tail CTAs) reads: split `split` of the pair (sequence, run of `blocks` kv-head
// blocks) number cta % pairs, its tiles [first_tile, end_tile), for `heads` q heads. Split-major, so that the last
// split of every pair, the shortest, is launched last: at one wave those are the CTAs that start late, when the tail
// CTAs free their slots. A tail CTA's pair is its own number (split 0, one block).
struct CtaWork {
  SequenceKvView seq;
  int head, split, first_tile, end_tile;  // head: the kv head
  int heads;                              // q heads served: group * blocks
  size_t partial_row;                     // the partials of the first of them
};

__device__ __forceinline__ CtaWork cta_work(const DecodeParams& p, int cta, int blocks) {
  CtaWork w;
  const int runs_per_head = p.head_blocks / blocks, pairs_per_seq = p.num_kv_heads * runs_per_head;
  const int pairs = p.num_seqs * pairs_per_seq, pair = cta % pairs;
  w.split = cta / pairs;
  w.head = pair % pairs_per_seq / runs_per_head;
  w.seq = p.seqs[pair / pairs_per_seq];
  w.first_tile = w.split * p.tiles_per_split;
  // The last split also takes any tiles past the plan's splits (a plan kept from a step when the sequence was
  // shorter): slower, but the attention over all of them.
  const bool last = w.split + 1 == p.num_splits;
  w.end_tile = last ? w.seq.num_tiles : min(w.first_tile + p.tiles_per_split, w.seq.num_tiles);
  w.heads = p.group * blocks;
  w.partial_row = static_cast<size_t>(pair) * w.heads;  // q heads: sequence-major, then kv head, then block
  return w;
}

// The queries of `heads` q heads from partial_row on, rotated into the storage space: store(h, c, x) for every head
// h < kHeads and channel c (heads past `heads`: zero). A warp's heads are loaded before any is rotated, so that
// their loads overlap.
template <int D, int kHeads = kMaxGroup, class Store>
__device__ void load_rotated_queries(const DecodeParams& p, size_t partial_row, int heads, Store&& store) {
  constexpr int E = D / 32, kHeadsPerWarp = kHeads / kWarps;
  static_assert(kHeads % kWarps == 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float x[kHeadsPerWarp][E] = {};
#pragma unroll
  for (int j = 0; j < kHeadsPerWarp; ++j) {
    const int h = warp + j * kWarps;
    if (h < heads) {
      const __half2* src = reinterpret_cast<const __half2*>(p.q + (partial_row + h) * D + lane * E);
#pragma unroll
      for (int i = 0; i < E; i += 2) {
        const float2 pair = __half22float2(src[i / 2]);
        x[j][i] = pair.x, x[j][i + 1] = pair.y;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kHeadsPerWarp; ++j) {
    if (p.rotated && warp + j * kWarps < heads) hadamard_warp<D>(x[j]);
#pragma unroll
    for (int i = 0; i < E; ++i) store(warp + j * kWarps, lane * E + i, x[j][i]);
  }
}

// A block's queries (p.group heads) as fp32 rows qs[kMaxGroup][D].
template <int D>
__device__ void load_rotated_queries(const DecodeParams& p, size_t partial_row, float* qs) {
  load_rotated_queries<D>(p, partial_row, p.group, [&](int h, int c, float x) { qs[h * D + c] = x; });
}

// The merge buffer in shared memory, [warp][kMaxTileGroup][D + 2]: each warp's o[D], m, l for the heads it serves.
template <int D>
__device__ __forceinline__ float* warp_state(uint8_t* shared, int warp, int head) {
  return reinterpret_cast<float*>(shared) + (warp * kMaxTileGroup + head) * (D + 2);
}
constexpr size_t merge_buffer_bytes(int d) { return sizeof(float) * kWarps * kMaxTileGroup * (d + 2); }

// The softmax states of each of `heads` heads merged: the 4 warps' in the merge buffer (where `warps`: after every
// warp has written its own, and a barrier) and, where `extra` is not null, one more per head at extra + head (D + 4)
// (o[D], m, l). Warp w takes heads w, w + 4 and each lane its D/32 channels lane D/32 ...; the result goes to
// store(head, o, m, l) (m and l the head's, in every lane). The factors are a head's, so a lane takes one exp2 per
// state and head, not per channel.
template <int D, class Store>
__device__ void merge_states(uint8_t* shared, int heads, bool warps, const float* extra, Store&& store) {
  constexpr int E = D / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int h = warp; h < heads; h += kWarps) {
    const float* other = extra ? extra + h * (D + 4) : nullptr;
    float mx = other ? other[D] : -FLT_MAX;
    if (warps)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_state<D>(shared, w, h)[D]);
    float l = 0, o[E] = {};
    auto add = [&](const float* state) {
      const float f = exp2f(state[D] - mx);
      l += state[D + 1] * f;
#pragma unroll
      for (int i = 0; i < E; ++i) o[i] += state[lane * E + i] * f;
    };
    if (other) add(other);
    if (warps)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) add(warp_state<D>(shared, w, h));
    store(h, o, mx, l);
  }
}

// After every warp has written its state (and a barrier): the CTA's partial number `split` of each of its heads.
template <int D>
__device__ void write_partial_from_warp_states(const DecodeParams& p, uint8_t* shared, size_t partial_row, int heads,
                                               int split) {
  const int lane = threadIdx.x & 31;
  merge_states<D>(shared, heads, true, nullptr, [&](int h, const float (&o)[D / 32], float m, float l) {
    const size_t slot = (partial_row + h) * (p.num_splits + 1) + split;
    store_floats(p.partial_o + slot * D + lane * (D / 32), o);
    if (lane == 0) p.partial_ml[slot] = make_float2(m, l);
  });
}

// Writes a warp's softmax state (lane (g, m): head g, channels (2m + e) NV + i in o[i][e]; l over the lane's own
// tokens) to the merge buffer and waits for every warp's. Every warp of the CTA calls it.
template <int D>
__device__ void store_warp_state(const DecodeParams& p, uint8_t* shared, const float (&o)[D / 8][2], float m_run,
                                 float l_run) {
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
}

}  // namespace kvarn::cuda::decode
