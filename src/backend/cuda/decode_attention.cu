// Shape contract: see decode_attention.h; cache layout: kv_layout.h; tile layout: codec/tile_layout.h.
//
// decode_attention_kernel: 1-D grid of pairs * (num_splits + 1) CTAs over the (sequence n, kv-head h) pairs, 128
// threads (4 warps). The first `pairs` CTAs read the fp16 tails (rows staged in shared memory, fp32 arithmetic; short,
// and first so that they do not trail the launch); then pair-major, CTA split s of pair (n, h) reads the tiles [s*tps,
// (s+1)*tps) of sequence n, kv-head h, through a cp.async ring of whole tiles in shared memory (16-byte copies, several
// tiles in flight). Each CTA leaves one partial softmax state (m, l, o[D]) per q head. Every warp owns a fixed quarter
// of each tile's tokens and keeps its own online softmax; the 4 states merge at the end.
// Per tile, per warp, on tensor cores (mma m16n8k16, rows = the <= 8 q heads of the group):
//   scores  S[h][t] = s_tok[t] * (sum_c (q'[h][c] a_K[c]) code[c][t] + sum_c q'[h][c] z_K[c])   (K = channels)
//   values  O[h][c] += s_ch[c] * (sum_t (p[h][t] a_V[t]) code[t][c] + sum_t p[h][t] z_V[t])    (K = tokens)
// KVarN A operands (q' a_K scale, folded once per tile for the 4 warps into shared memory together with the tile's
// scales as fp32, and p a_V) are split into an fp16 high part (rows 0-7) and the fp16 rounding of the rest (rows 8-15,
// otherwise padding), so the two row halves of the result add up to the operand with ~2^-22 instead of 2^-12 relative
// rounding: a sink's large score no longer moves the other weights. Codes enter as the raw bits of fp16 subnormals,
// code * 2^k * 2^-24 for a code at bit k of a 16-bit half (one mask per two codes, exact; the tensor cores take
// subnormal fp16 inputs), and 2^(24-k) comes off in fp32; no dequantized copy is ever written. (fp16 tiles: the raw
// fp16 q, p and K/V with rows 8-15 zero, the scale applied to the fp32 scores.) The token and channel orders inside an
// mma are permuted so that each thread's B operand comes from one 32-bit word of the packed rows (any permutation of
// the reduced index, used consistently in A and B, gives the same sum).
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

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 128, kWarps = 4, kMaxGroup = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kSubnormalScale = 16777216.0f;  // 2^24: a code c in the low bits of an fp16 is c * 2^-24

// KVarN: as many tiles in flight as fit with 3 CTAs per SM (~68 KB of ring each); fp16 tiles are 16-64 KB.
// (4 CTAs per SM cap the registers at 128 and spill; measured slower.)
template <class F>
constexpr int stages() {
  if constexpr (F::kCodes) return std::clamp(static_cast<int>(68000 / F::L.bytes), 2, 4);
  return F::L.bytes <= 20000 ? 4 : F::L.bytes <= 40000 ? 3 : 2;
}
template <class F>
constexpr int min_blocks_per_sm() {
  return F::kCodes ? 3 : 1;
}

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

// Tile copies swizzle 16-byte chunks so that the warps' fragment reads hit distinct banks: KVarN key-code rows
// of 4 chunks swap chunk pairs on bit 1 of the row; fp16 rows XOR the chunk index with the row's low 3 bits.
// Thread i copies chunks i, i + 128, ...; a row's chunk count and 8 rows of them divide 128, so the swizzle moves
// all of a thread's chunks of the swizzled region by the same offset, computed once per kernel.
template <class F>
__device__ __forceinline__ int chunk_swizzle_offset(int tid) {
  if constexpr (F::kCodes) {
    if constexpr (F::G / 32 != 4) return 0;
    return ((tid >> 3) & 1) ? ((tid & 2) ? -2 : 2) : 0;
  } else {
    constexpr int kRowChunks = F::D / 8;
    static_assert(kRowChunks >= 8 && kThreads % (8 * kRowChunks) == 0);
    const int x = tid % kRowChunks;
    return (x ^ ((tid / kRowChunks) & 7)) - x;
  }
}

// Copies one tile (src: its bytes for one kv-head) into a ring stage: one cp.async per chunk.
template <class F>
__device__ __forceinline__ void copy_tile_async(uint8_t* stage, const uint8_t* __restrict__ src, int swizzle) {
  constexpr int kChunks = static_cast<int>(F::L.bytes / 16), kRounds = (kChunks + kThreads - 1) / kThreads;
  // KVarN: the key-code rows, whole rounds (D * 4 chunks); fp16: everything.
  constexpr int kSwizzledRounds = F::kCodes ? (F::G / 32 == 4 ? F::D * 4 / kThreads : 0) : kRounds;
  static_assert(!F::kCodes || (F::D * 4) % kThreads == 0);
  const int tid = threadIdx.x;
  const uint8_t* from = src + 16 * tid;  // then constant offsets: one instruction per chunk
  uint8_t* to = stage + 16 * tid;
#pragma unroll
  for (int i = 0; i < kRounds; ++i)
    if (kChunks % kThreads == 0 || i < kRounds - 1 || tid + i * kThreads < kChunks)
      cp_async_16(to + 16 * (i * kThreads + (i < kSwizzledRounds ? swizzle : 0)), from + 16 * i * kThreads);
}

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

// Shared memory of a CTA: the ring of tiles (reused by the tail's rows and scores and by the final merge), then
// the per-tile folded query fragments (KVarN: hi and lo parts) and the tile's scales as fp32, then the group's
// rotated queries.
template <class F>
struct SharedLayout {
  static constexpr int D = F::D, G = F::G, KBLK = D / 16;
  static constexpr size_t ring = std::max({stages<F>() * F::L.bytes, sizeof(float) * kWarps * kMaxGroup * (D + 2),
                                           size_t{2} * G * D + sizeof(float) * kMaxGroup * G});
  static constexpr size_t scales = sizeof(float) * (3 * padded_size(G) + padded_size(D));
  static constexpr size_t folded = sizeof(uint4) * KBLK * kMaxGroup * 4 + sizeof(float) * kMaxGroup + scales;
  static constexpr size_t query = sizeof(float) * kMaxGroup * D;
  static constexpr size_t bytes = ring + folded + query;
};

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

template <class F>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<F>()) decode_attention_kernel(const DecodeParams p) {
  constexpr int D = F::D, G = F::G, NT = G / 32, KBLK = D / 16, NV = D / 8, S = stages<F>();
  constexpr codec::TileLayout L = F::L;
  using Shared = SharedLayout<F>;
  extern __shared__ __align__(16) uint8_t shared[];
  uint8_t* ring = shared;
  uint4* folded_q = reinterpret_cast<uint4*>(shared + Shared::ring);  // [KBLK][head][m]: A fragments, hi/lo
  float* folded_z = reinterpret_cast<float*>(folded_q + KBLK * kMaxGroup * 4);  // [head]: sum_c q' z_K
  // The tile's scales as fp32, padded: s_tok_K[t], a_V[t], z_V[t], and s_ch_V[c] * 2^(24-k) (k: the bit of
  // channel c's code in the 16-bit half its mma operand comes from).
  float* s_tok_f = folded_z + kMaxGroup;
  float* a_v_f = s_tok_f + padded_size(G);
  float* z_v_f = a_v_f + padded_size(G);
  float* s_ch_f = z_v_f + padded_size(G);
  float* qs = reinterpret_cast<float*>(shared + Shared::ring + Shared::folded);

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may launch once every CTA has started
#endif
  const int pairs = p.num_seqs * p.num_kv_heads;
  const bool tail = static_cast<int>(blockIdx.x) < pairs;
  const int pair = tail ? blockIdx.x : (blockIdx.x - pairs) / p.num_splits;
  const int split = tail ? p.num_splits : (blockIdx.x - pairs) % p.num_splits;
  const int head = pair % p.num_kv_heads, seq_index = pair / p.num_kv_heads;
  const SequenceKvView seq = p.seqs[seq_index];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, col = lane / 4, m4 = lane % 4;
  const int first_tile = split * p.tiles_per_split;
  const int end_tile = min(first_tile + p.tiles_per_split, seq.num_tiles);
  if (tail ? seq.tail_len == 0 : first_tile >= end_tile) return;
  const size_t partial_row = static_cast<size_t>(seq_index) * p.num_kv_heads * p.group + head * p.group;

  // The group's queries, rotated into the storage space (rows past the group are zero).
  for (int h = warp; h < kMaxGroup; h += kWarps) {
    constexpr int E = D / 32;
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
  __syncthreads();
  if (tail) {
    attend_tail<F>(p, seq, qs, ring, head, partial_row, p.num_splits);
    return;
  }

  // Token of column x of this warp's local n-tile j. KVarN: the nibble index inside a key-code word is the
  // n-tile, the word is the column; fp16: n-tile j holds 8 consecutive tokens.
  auto token = [warp](int j, int x) {
    if constexpr (F::kCodes) {
      constexpr int halves = G / 64, warps_per_half = kWarps / halves;
      return 8 * (x + 8 * (warp / warps_per_half)) + (warp % warps_per_half) * NT + j;
    } else {
      return 8 * (warp * NT + j) + x;
    }
  };

  // fp16 tiles: the raw query is the A operand for every tile (channels kb*16 + 4m + i <-> k-slots).
  uint32_t q_frag[F::kCodes ? 1 : KBLK][2];
  if constexpr (!F::kCodes) {
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      const float* q = qs + col * D + kb * 16 + 4 * m4;
      q_frag[kb][0] = pack_half2(q[0], q[1]);
      q_frag[kb][1] = pack_half2(q[2], q[3]);
    }
  }

  // KVarN: the folded query rows of heads past the group stay zero (the per-tile fold skips them).
  if constexpr (F::kCodes) {
    for (int i = tid; i < KBLK * kMaxGroup * 4; i += kThreads)
      if ((i / 4) % kMaxGroup >= p.group) folded_q[i] = make_uint4(0, 0, 0, 0);
    if (tid < kMaxGroup && tid >= p.group) folded_z[tid] = 0;
  }

  float o[NV][2] = {};
  float m_run = -FLT_MAX, l_run = 0;

  const int32_t* table = p.block_tables + seq.block_table_offset;
  const int num = end_tile - first_tile;
  const int swizzle = chunk_swizzle_offset<F>(tid);
  auto tile_bytes = [&](int i) {
    return p.blocks + (static_cast<size_t>(table[first_tile + i]) * p.num_kv_heads + head) * L.bytes;
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < num) copy_tile_async<F>(ring + s * L.bytes, tile_bytes(s), swizzle);
    cp_async_commit();
  }
  for (int it = 0; it < num; ++it) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (it + S - 1 < num) copy_tile_async<F>(ring + ((it + S - 1) % S) * L.bytes, tile_bytes(it + S - 1), swizzle);
    cp_async_commit();
    const uint8_t* tile = ring + (it % S) * L.bytes;

    // ---- scores (log2 units) ----
    float s[NT][2];
    if constexpr (F::kCodes) {
      // Fold a_K and the softmax scale into the query once per tile for all warps: q'_c a_K[c] as hi/lo fp16
      // fragments, and per head sum_c q'_c z_K[c].
      {
        const __half* a_k = reinterpret_cast<const __half*>(tile + L.key_scale);
        const __half* z_k = reinterpret_cast<const __half*>(tile + L.key_zero);
        const int h = tid / 16, part = tid % 16;
        if (h < p.group) {
          float z_sum = 0;
#pragma unroll
          for (int e = part; e < KBLK * 4; e += 16) {
            const int kb = e / 4, m = e % 4;
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int c = kb * 16 + m + 4 * i;
              const float q = qs[h * D + c] * p.scale_log2;
              v[i] = q * __half2float(a_k[c]);
              z_sum += q * __half2float(z_k[c]);
            }
            uint4 a;  // A fragment {a0, a1, a2, a3}: rows g (hi) and g + 8 (lo)
            split_half2(v[0], v[1], a.x, a.y);
            split_half2(v[2], v[3], a.z, a.w);
            folded_q[(kb * kMaxGroup + h) * 4 + m] = a;
          }
          const unsigned half_warp = 0xffffu << (16 * (h & 1));  // the 16 threads of head h
#pragma unroll
          for (int o = 1; o < 16; o *= 2) z_sum += __shfl_xor_sync(half_warp, z_sum, o);
          if (part == 0) folded_z[h] = z_sum;
        }
        // The scales once per CTA as fp32, instead of once per warp and fragment as fp16 conversions.
        if (tid < G) {
          s_tok_f[padded(tid)] = __half2float(reinterpret_cast<const __half*>(tile + L.key_token_scale)[tid]);
          a_v_f[padded(tid)] = __half2float(reinterpret_cast<const __half*>(tile + L.value_scale)[tid]);
          z_v_f[padded(tid)] = __half2float(reinterpret_cast<const __half*>(tile + L.value_zero)[tid]);
        }
        if (tid < D) {
          const int k = (tid % NV) % (8 / F::VB) * F::VB;
          s_ch_f[padded(tid)] = __half2float(reinterpret_cast<const __half*>(tile + L.value_channel_scale)[tid]) *
                                (kSubnormalScale / static_cast<float>(1 << k));
        }
      }
      __syncthreads();

      // Key codes enter the mma as fp16 subnormals code * 2^k * 2^-24 (code at bit k = 0 or 4 of a byte: one
      // byte permute per two n-tiles, one mask per operand); 2^(24-k) comes off in fp32 below. Channel of k-slot
      // i (0..3 <-> 2m, 2m+1, 2m+8, 2m+9): kb*16 + m + 4i.
      const uint32_t* codes = reinterpret_cast<const uint32_t*>(tile + L.key_codes);
      constexpr int kRowWords = G / 8, kRowChunks = G / 32;
      constexpr int halves = G / 64, warps_per_half = kWarps / halves;
      const int word = col + 8 * (warp / warps_per_half);
      const int first_byte = (warp % warps_per_half) * NT / 2;
      float acc[NT][4] = {};
#pragma unroll
      for (int kb = 0; kb < KBLK; ++kb) {
        const uint4 q4 = folded_q[(kb * kMaxGroup + col) * 4 + m4];
        const uint32_t a[4] = {q4.x, q4.y, q4.z, q4.w};
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = kb * 16 + m4 + 4 * i;
          int chunk = word / 4;
          if (kRowChunks == 4) chunk ^= ((c >> 1) & 1) << 1;
          w[i] = codes[c * kRowWords + chunk * 4 + word % 4];
        }
#pragma unroll
        for (int jp = 0; jp < NT / 2; ++jp) {
          const uint32_t sel = pair_selector(first_byte + jp);
          const uint32_t x01 = __byte_perm(w[0], w[1], sel), x23 = __byte_perm(w[2], w[3], sel);
          mma_m16n8k16_rows16(acc[2 * jp], a, x01 & 0x000f000fu, x23 & 0x000f000fu);
          mma_m16n8k16_rows16(acc[2 * jp + 1], a, x01 & 0x00f000f0u, x23 & 0x00f000f0u);
        }
      }
      const float z = folded_z[col];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float s_tok[NT];  // tokens token(j, x) of j = 0..NT-1 are consecutive
        load_floats(s_tok_f + padded(token(0, 2 * m4 + e)), s_tok);
#pragma unroll
        for (int j = 0; j < NT; ++j)
          s[j][e] = s_tok[j] * ((acc[j][e] + acc[j][e + 2]) * ((j & 1) ? kSubnormalScale / 16 : kSubnormalScale) + z);
      }
    } else {
      const uint8_t* keys = tile + L.key_codes;
      float acc[NT][4] = {};
#pragma unroll
      for (int kb = 0; kb < KBLK; ++kb)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int t = token(j, col);
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

    // ---- values ----
    if constexpr (F::kCodes) {
      // A = p * a_V as hi/lo fp16, B = value codes as fp16 subnormals like the keys; channel of column x of
      // n-tile i: x*NV + i. The accumulators start at sum_t p z_V * 2^(k-24), so that one multiply by
      // s_ch * 2^(24-k) (s_ch_f) finishes the tile's contribution.
      constexpr int VB = F::VB, kRowBytes = D * VB / 8, kColBytes = D * VB / 64;
      constexpr int kCodesPerByte = 8 / VB;
      const uint8_t* codes = tile + L.value_codes;
      float a_v[2][NT], z_v[2][NT];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        load_floats(a_v_f + padded(token(0, 2 * m4 + e)), a_v[e]);
        load_floats(z_v_f + padded(token(0, 2 * m4 + e)), z_v[e]);
      }
      uint32_t a[NT / 2][4];
      uint32_t v[NT / 2][4][(kColBytes + 3) / 4];
      float pz = 0;
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        float pa[2][2];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int t = token(2 * kk + jj, 2 * m4 + e);
            pa[jj][e] = s[2 * kk + jj][e] * a_v[e][2 * kk + jj];
            pz += s[2 * kk + jj][e] * z_v[e][2 * kk + jj];
            const uint8_t* row = codes + t * kRowBytes + col * kColBytes;
            if constexpr (kColBytes == 2) {
              v[kk][2 * jj + e][0] = *reinterpret_cast<const uint16_t*>(row);
            } else {
#pragma unroll
              for (int w = 0; w < kColBytes / 4; ++w)
                v[kk][2 * jj + e][w] = reinterpret_cast<const uint32_t*>(row)[w];
            }
          }
        split_half2(pa[0][0], pa[0][1], a[kk][0], a[kk][1]);
        split_half2(pa[1][0], pa[1][1], a[kk][2], a[kk][3]);
      }
      pz += __shfl_xor_sync(0xffffffffu, pz, 1);
      pz += __shfl_xor_sync(0xffffffffu, pz, 2);
      // s_ch * 2^(24-k) of this thread's output channels (2m + e) * NV + i.
      float s_ch[2][NV];
#pragma unroll
      for (int e = 0; e < 2; ++e) load_floats(s_ch_f + padded((2 * m4 + e) * NV), s_ch[e]);
#pragma unroll
      for (int byte_group = 0; byte_group < NV / kCodesPerByte; ++byte_group) {
        const int word = byte_group / 4, byte = byte_group % 4;
        uint32_t x_ab[NT / 2], x_cd[NT / 2];
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
          x_ab[kk] = __byte_perm(v[kk][0][word], v[kk][1][word], pair_selector(byte));
          x_cd[kk] = __byte_perm(v[kk][2][word], v[kk][3][word], pair_selector(byte));
        }
#pragma unroll
        for (int q = 0; q < kCodesPerByte; ++q) {
          const int i = byte_group * kCodesPerByte + q, k = q * VB;
          const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << k;
          const float pz_k = pz * (static_cast<float>(1 << k) / kSubnormalScale);
          float c[4] = {pz_k, pz_k, 0, 0};
#pragma unroll
          for (int kk = 0; kk < NT / 2; ++kk) mma_m16n8k16_rows16(c, a[kk], x_ab[kk] & mask, x_cd[kk] & mask);
#pragma unroll
          for (int e = 0; e < 2; ++e) o[i][e] = fmaf(s_ch[e][i], c[e] + c[e + 2], o[i][e]);
        }
      }
    } else {
      const uint8_t* values = tile + L.value_codes;
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
              const int t = token(2 * kk + jj, 2 * m4 + e);
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
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the merge

  // ---- merge the 4 warps' states, write this split's partial ----
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  float* merge = reinterpret_cast<float*>(ring);  // [warp][group][D + 2]
  if (col < p.group) {
    float* dst = merge + (warp * kMaxGroup + col) * (D + 2);
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) dst[(2 * m4 + e) * NV + i] = o[i][e];
    if (m4 == 0) dst[D] = m_run, dst[D + 1] = l_run;
  }
  __syncthreads();
  for (int idx = tid; idx < p.group * D; idx += kThreads) {
    const int h = idx / D, c = idx % D;
    float mx = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, merge[(w * kMaxGroup + h) * (D + 2) + D]);
    float l = 0, acc = 0;
    for (int w = 0; w < kWarps; ++w) {
      const float* src = merge + (w * kMaxGroup + h) * (D + 2);
      const float f = exp2f(src[D] - mx);
      l += src[D + 1] * f;
      acc += src[c] * f;
    }
    const size_t slot = (partial_row + h) * (p.num_splits + 1) + split;
    p.partial_o[slot * D + c] = acc;
    if (c == 0) p.partial_ml[slot] = make_float2(mx, l);
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
                                          SharedLayout<F>::bytes));
    KVARN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_attention_kernel<F>, kThreads,
                                                                   SharedLayout<F>::bytes));
  });
  return std::max(blocks, 1);
}

}  // namespace

DecodeAttentionPlan plan_decode_attention(const KvCacheLayer& cache, int num_seqs, int num_q_heads, int max_tiles) {
  DecodeAttentionPlan plan;
  int per_sm = 1;
  with_tile_format(cache, "decode_attention", [&](auto f) { per_sm = blocks_per_sm<decltype(f)>(); });
  // Split-K over tiles. CTAs of equal length run in waves of (SMs x CTAs per SM), and a last wave that is only
  // partly full costs much of a whole one (a CTA's pace is set by its own instruction latencies more than by
  // memory, so the CTAs of a thin wave run only a little faster). Choose the split that minimizes waves x (tiles per
  // CTA + ~2 tiles of per-CTA start and merge); the tail CTAs are short and run first, so they are left out.
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
    const double cost = static_cast<double>((pairs * used + slots - 1) / slots) * (per_split + kCtaOverheadTiles);
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
    decode_attention_kernel<F><<<static_cast<unsigned>(ctas), kThreads, SharedLayout<F>::bytes, stream>>>(p);
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
