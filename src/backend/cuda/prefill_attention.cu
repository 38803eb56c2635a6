// Shape contract: see prefill_attention.h; cache layout: kv_layout.h; tile layout: codec/tile_layout.h.
//
// rotate_chunk_kernel (rotated dtypes): grid (row blocks, sequences), one warp per (row, kv-head, K|V) of a sequence
// with something cached, H_D in registers, fp16 into the workspace [K|V][num_rows][H_kv][D]: the chunk's K/V in
// the space the tiles and tails are stored in (a sequence with nothing cached reads its chunk as given, below).
// dequantize_prefix_tiles (code-tile caches, dequantize_prefix.cu): the prefix's tiles decoded once into fp16
// tiles in the workspace, after the rotated chunk; the attention then reads them as an fp16 cache's tiles.
//
// prefill_attention_kernel: grid (q heads, q blocks, sequences), 128 threads = 4 warps x 32 query rows (two mma
// row tiles, so that every K/V fragment read from shared memory serves both: FlashAttention-2's split, half the
// shared-memory reads per FLOP of 16 rows per warp), <= 255 registers and 96 KB of shared memory for 2 CTAs per
// SM. The CTA serves 128 chunk rows of one q head; q blocks run last-first, every head's before the next block, so
// that the longest causal rows of all heads start earliest and the short ones fill the last wave. A sequence's
// keys/values form one stream
//     [prefix tiles: num_tiles * G tokens][prefix tail: tail_len tokens][chunk: chunk_len tokens]
// read in blocks of 64 tokens up to the CTA's last row, each copied by cp.async one block ahead into one of two
// shared-memory buffers as fp16 K[64][D] and V[64][D] in the storage space (see below for a sequence with nothing
// cached); a warp skips the blocks past its own rows. Every row's 16-byte chunks are XOR-swizzled by the row's
// low 3 bits so that the ldmatrix reads of a fragment hit distinct banks.
// Per block and warp, on tensor cores: S = Q K^T (Q's fp16 fragments read from shared memory per k-block; the scale
// applied to S in fp32 inside the exponent's FMA, as an fp16 product would shift a 100x sink's weight by ~1%),
// causal mask on the chunk's diagonal, online softmax in fp32 (exp2) whose reference moves only when a row's
// maximum passes it by 2^8 (kStaleReference: the output is rescaled in few blocks), O += P V with P rounded to
// fp16. At the end O / l is rotated back by H_D (rotated dtypes) and written as fp16. A sequence with nothing
// cached (no tiles, no tail) needs no storage space: H_D is orthogonal, so it attends with the model-space q, K and V
// as given, and its queries and outputs are not rotated (a warp rotates its 32 rows one after the other: H200,
// k4v2 without a prefix ran at 0.83-0.94x of fp16 with them).
// FLOPs: 4 D per (query, key) pair the causal mask keeps.
// Bytes: q and out 2 D per row and q head; per CTA, each visible block once (4 D bytes per token; the repeats
// over q heads and q blocks are served by L2).
#include "backend/cuda/prefill_attention.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dequantize_prefix.h"
#include "backend/cuda/exp2_approx.cuh"
#include "backend/cuda/hadamard_warp.cuh"
#include "backend/cuda/mma_fragments.cuh"
#include "backend/cuda/per_device.h"
#include "backend/cuda/tile_formats.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace kvarn::cuda {

namespace {

// A warp's rows are kMTiles mma row tiles, so that each K/V fragment it reads from shared memory serves them all.
constexpr int kThreads = 128, kWarps = 4, kMTiles = 2, kRowsPerWarp = 16 * kMTiles, kRows = kWarps * kRowsPerWarp;
constexpr int kBlock = 64;
constexpr float kLog2e = 1.4426950408889634f;
// How far (log2 units) a row's maximum may pass the reference of its weights before the reference moves.
constexpr float kStaleReference = 8.0f;

struct PrefillParams {
  const __half* q;
  const __half* k;  // the chunk's K/V as given, in the model space
  const __half* v;
  const __half* k_stored;  // the same in the storage space (rotated dtypes: the workspace's rotated copy)
  const __half* v_stored;
  __half* out;
  const uint8_t* tiles;  // fp16 tiles: the cache's blocks, or the workspace's decoded prefix (kDecodedPrefix)
  const __half* tails;
  const PrefillSequence* seqs;
  const int32_t* block_tables;
  int num_q_heads, num_kv_heads, group, q_blocks;
  float scale_log2;
  bool rotated;
};

// A sequence with nothing cached (no tiles, no tail) attends in the model space: H_D is orthogonal, so its scores
// and outputs are the same in both, and the rotations of its chunk, queries and outputs are left out.
__device__ __forceinline__ bool attends_in_storage_space(const PrefillSequence& seq, bool rotated_dtype) {
  return rotated_dtype && seq.prefix.num_tiles + seq.prefix.tail_len > 0;
}

template <int D>
__global__ void rotate_chunk_kernel(const __half* __restrict__ k, const __half* __restrict__ v,
                                    const PrefillSequence* __restrict__ seqs, int num_rows, int num_kv_heads,
                                    __half* __restrict__ rotated) {
  constexpr int E = D / 32;
  const PrefillSequence seq = seqs[blockIdx.y];
  if (!attends_in_storage_space(seq, true)) return;
  const long warp = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const long per_tensor = static_cast<long>(seq.chunk_len) * num_kv_heads;
  if (warp >= 2 * per_tensor) return;
  const int which = static_cast<int>(warp / per_tensor);  // 0: key, 1: value
  const long vec = static_cast<long>(seq.chunk_begin) * num_kv_heads + warp % per_tensor;
  const __half* src = (which == 0 ? k : v) + vec * D + lane * E;
  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = __half2float(src[i]);
  hadamard_warp<D>(x);
  __half* dst = rotated + (which * static_cast<long>(num_rows) * num_kv_heads + vec) * D + lane * E;
#pragma unroll
  for (int i = 0; i < E; ++i) dst[i] = __float2half_rn(x[i]);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared [rows][D] fp16 block.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D * 2 + ((chunk ^ (row & 7)) << 4);
}

// Starts copying kCount rows into a swizzled [kCount][D] fp16 block, row t from src + t * stride; kChecked: rows
// from `valid` on are zeros instead (without it no check is compiled). Thread tid copies 16-byte chunk
// tid % kChunks of rows tid / kChunks + i kRowsPerPass, which share one swizzle (kRowsPerPass is a multiple of 8),
// so that a row's addresses are a base and constant steps.
template <int D, int kCount, bool kChecked = false>
__device__ __forceinline__ void copy_rows(const __half* src, size_t stride, uint8_t* dst, int valid = kCount) {
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;
  static_assert(kRowsPerPass % 8 == 0 && kCount % kRowsPerPass == 0);
  const int t0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  src += t0 * stride + 8 * c;
  dst += swizzled<D>(t0, c);
#pragma unroll
  for (int i = 0; i < kCount / kRowsPerPass; ++i) {
    uint8_t* to = dst + i * kRowsPerPass * D * 2;
    if (!kChecked || t0 + i * kRowsPerPass < valid) {
      cp_async_16(to, src + i * kRowsPerPass * stride);
    } else {
      *reinterpret_cast<uint4*>(to) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Starts copying 64 rows of K and V into the swizzled K/V blocks, row t from k + t * stride and v + t * stride.
template <int D>
__device__ __forceinline__ void copy_rows(const __half* k, const __half* v, size_t stride, uint8_t* ks, uint8_t* vs) {
  copy_rows<D, kBlock>(k, stride, ks);
  copy_rows<D, kBlock>(v, stride, vs);
}

// Starts loading stream tokens [64 b, 64 b + 64) of one (sequence, kv-head), a block of its prefix tiles (G is a
// multiple of 64), into the K/V blocks. kDecodedPrefix: tile i of a sequence is slot prefix_tile_begin + i of
// p.tiles (code tiles decoded into the workspace), not its block (fp16 caches).
template <class F, bool kDecodedPrefix>
__device__ void load_tile_block(const PrefillParams& p, const PrefillSequence& seq, int kv_head, int b,
                                uint8_t* ks, uint8_t* vs) {
  constexpr int D = F::D, G = F::G;
  const int first = b * kBlock, tile = first / G;
  const int32_t slot =
      kDecodedPrefix ? seq.prefix_tile_begin + tile : p.block_tables[seq.prefix.block_table_offset + tile];
  const uint8_t* tile_bytes = p.tiles + (static_cast<size_t>(slot) * p.num_kv_heads + kv_head) * F::L.bytes;
  const size_t row = static_cast<size_t>(first % G) * D;
  copy_rows<D>(reinterpret_cast<const __half*>(tile_bytes + F::L.key_codes) + row,
               reinterpret_cast<const __half*>(tile_bytes + F::L.value_codes) + row, D, ks, vs);
}

// The same for a block past the prefix tiles: tail and chunk tokens (the chunk's from chunk_k / chunk_v);
// positions past the stream are zeros (a masked score times a NaN value would still poison the mma).
template <class F>
__device__ void load_stream_block(const PrefillParams& p, const PrefillSequence& seq, int kv_head, int b,
                                  const __half* chunk_k, const __half* chunk_v, uint8_t* ks, uint8_t* vs) {
  constexpr int D = F::D, G = F::G, kChunks = D / 8;
  const int first = b * kBlock, tile_tokens = seq.prefix.num_tiles * G;
  const int tail_end = tile_tokens + seq.prefix.tail_len, end = tail_end + seq.chunk_len;
  if (first >= tail_end && first + kBlock <= end) {  // chunk rows only: most blocks of a long chunk
    const size_t row = static_cast<size_t>(seq.chunk_begin + first - tail_end) * p.num_kv_heads + kv_head;
    copy_rows<D>(chunk_k + row * D, chunk_v + row * D, static_cast<size_t>(p.num_kv_heads) * D, ks, vs);
    return;
  }
  const __half* tail_k =
      p.tails + (static_cast<size_t>(seq.prefix.tail_slot) * 2 * p.num_kv_heads + kv_head) * G * D;
  const __half* tail_v = tail_k + static_cast<size_t>(p.num_kv_heads) * G * D;
  for (int w = threadIdx.x; w < kBlock * kChunks; w += kThreads) {
    const int t = w / kChunks, c = w % kChunks, pos = first + t;
    const __half *k = nullptr, *v = nullptr;
    if (pos < tail_end) {
      k = tail_k + static_cast<size_t>(pos - tile_tokens) * D;
      v = tail_v + static_cast<size_t>(pos - tile_tokens) * D;
    } else if (pos < end) {
      const size_t row = static_cast<size_t>(seq.chunk_begin + pos - tail_end) * p.num_kv_heads + kv_head;
      k = chunk_k + row * D;
      v = chunk_v + row * D;
    }
    if (k) {
      cp_async_16(ks + swizzled<D>(t, c), k + 8 * c);
      cp_async_16(vs + swizzled<D>(t, c), v + 8 * c);
    } else {
      *reinterpret_cast<uint4*>(ks + swizzled<D>(t, c)) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(vs + swizzled<D>(t, c)) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Rotates a warp's 32 query rows in place by H_D once their copy (the cp.async group before the newest) landed.
template <int D>
__device__ __forceinline__ void rotate_query_rows(uint8_t* qs, int warp_row0) {
  constexpr int E = D / 32;
  const int byte = (threadIdx.x & 31) * E * 2;
  cp_async_wait<1>();
  __syncthreads();
#pragma unroll 4
  for (int r = warp_row0; r < warp_row0 + kRowsPerWarp; ++r) {
    uint32_t* row = reinterpret_cast<uint32_t*>(qs + swizzled<D>(r, byte / 16) + byte % 16);
    float x[E];
#pragma unroll
    for (int i = 0; i < E; i += 2) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(row + i / 2));
      x[i] = pair.x, x[i + 1] = pair.y;
    }
    hadamard_warp<D>(x);
#pragma unroll
    for (int i = 0; i < E; i += 2) row[i / 2] = pack_half2(x[i], x[i + 1]);
  }
}

// Q and two buffers of K and V blocks; at the end the fp32 output rows (padded by 8 floats against bank
// conflicts) reuse them.
template <int D>
constexpr size_t shared_bytes() {
  return std::max(sizeof(__half) * (kRows + 4 * kBlock) * D, sizeof(float) * kRows * (D + 8));
}

template <class F, bool kDecodedPrefix>
__global__ void __launch_bounds__(kThreads, 2) prefill_attention_kernel(const PrefillParams p) {
  constexpr int D = F::D, E = D / 32, KB = D / 16, NT = kBlock / 8, NO = D / 8;
  extern __shared__ __align__(16) uint8_t shared[];
  uint8_t* qs = shared;
  uint8_t* kv_buffers = qs + kRows * D * 2;  // [2][K, V][kBlock][D]
  auto keys = [&](int b) { return kv_buffers + (b & 1) * 2 * kBlock * D * 2; };
  auto values = [&](int b) { return keys(b) + kBlock * D * 2; };

  const int q_block = p.q_blocks - 1 - static_cast<int>(blockIdx.y), head = blockIdx.x;
  const PrefillSequence seq = p.seqs[blockIdx.z];
  const int row0 = q_block * kRows;
  if (row0 >= seq.chunk_len) return;
  const int kv_head = head / p.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, g = lane / 4, m4 = lane % 4;
  const int prefix_len = seq.prefix.num_tiles * F::G + seq.prefix.tail_len;
  const int warp_row0 = warp * kRowsPerWarp;
  const bool rotated = attends_in_storage_space(seq, p.rotated);
  const __half* chunk_k = rotated ? p.k_stored : p.k;
  const __half* chunk_v = rotated ? p.v_stored : p.v;

  // ---- this CTA's queries: fp16, swizzled in shared memory, read per k-block. Copied by cp.async with the first
  // K/V block (rows past the chunk: zeros) and rotated there in place as rotated says, rather than loaded into
  // registers a row at a time, each row waiting for its global load (the top stall sites in Nsight Compute) ----
  copy_rows<D, kRows, true>(p.q + (static_cast<size_t>(seq.chunk_begin + row0) * p.num_q_heads + head) * D,
                            static_cast<size_t>(p.num_q_heads) * D, qs, seq.chunk_len - row0);
  cp_async_commit();
  // Rows 16 mt + g and 16 mt + g + 8 of this warp: their stream positions bound the causal mask.
  const int warp_pos0 = prefix_len + row0 + warp_row0;  // the warp's first row's position
  const int last = prefix_len + min(row0 + kRows, seq.chunk_len);  // one past the CTA's last visible position
  const int num_blocks = (last + kBlock - 1) / kBlock;

  float o[kMTiles][NO][4] = {};
  // Per row (mt, r): the reference of its weights 2^(s scale_log2 - reference), and their sum.
  float reference[kMTiles][2], l_run[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) reference[mt][r] = -INFINITY, l_run[mt][r] = 0;
  auto attend_block = [&](int b) {
    const uint8_t* ks = keys(b);
    const uint8_t* vs = values(b);
    // ---- S = Q K^T (unscaled); each key fragment serves the warp's kMTiles row tiles ----
    float s[kMTiles][NT][4] = {};
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      uint32_t qa[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int row = warp_row0 + 16 * mt + lane % 8 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(qa[mt], qs + swizzled<D>(row, 2 * kb + lane / 16));
      }
#pragma unroll
      for (int tp = 0; tp < NT / 2; ++tp) {
        uint32_t kf[4];
        ldmatrix_x4(kf, ks + swizzled<D>(tp * 16 + (lane / 16) * 8 + lane % 8, 2 * kb + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16_rows16(s[mt][2 * tp], qa[mt], kf[0], kf[1]);
          mma_m16n8k16_rows16(s[mt][2 * tp + 1], qa[mt], kf[2], kf[3]);
        }
      }
    }
    const int first = b * kBlock;
    if (first + kBlock - 1 > warp_pos0) {  // the block reaches past some row's own position
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (first + 8 * j + 2 * m4 + (e & 1) > warp_pos0 + 16 * mt + g + (e / 2) * 8) s[mt][j][e] = -INFINITY;
    }

    // ---- online softmax of rows (mt, g) (e = 0, 1) and (mt, g + 8) (e = 2, 3), in log2 units ----
    // A row's reference moves only where its maximum passes it by more than kStaleReference (or for its first
    // keys), so that the output's rescaling is skipped in most blocks; the weights stay below 2^kStaleReference.
    float block_max[kMTiles][2];
    bool moves = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        block_max[mt][r] = mx * p.scale_log2;
        moves |= block_max[mt][r] > reference[mt][r] + kStaleReference;
      }
    if (__any_sync(0xffffffffu, moves)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        float correction[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float moved = fmaxf(reference[mt][r], block_max[mt][r]);
          correction[r] = moved == reference[mt][r] ? 1.0f : exp2_approx(reference[mt][r] - moved);
          reference[mt][r] = moved;
          l_run[mt][r] *= correction[r];
        }
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[mt][n][0] *= correction[0], o[mt][n][1] *= correction[0];
          o[mt][n][2] *= correction[1], o[mt][n][3] *= correction[1];
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float base = reference[mt][r] == -INFINITY ? 0.0f : reference[mt][r];  // nothing visible yet: zero
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[mt][j][e] = exp2_approx(fmaf(s[mt][j][e], p.scale_log2, -base));
            l_run[mt][r] += s[mt][j][e];
          }
      }

    // ---- O += P V; each value fragment serves the warp's kMTiles row tiles ----
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t pa[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        pa[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vs + swizzled<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, 2 * np + lane / 16));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16_rows16(o[mt][2 * np], pa[mt], vf[0], vf[1]);
          mma_m16n8k16_rows16(o[mt][2 * np + 1], pa[mt], vf[2], vf[3]);
        }
      }
    }
  };
  // A block past every row of this warp adds nothing to them (the CTA's later rows need it).
  auto attend_visible_block = [&](int b) {
    if (b * kBlock <= warp_pos0 + kRowsPerWarp - 1) attend_block(b);
  };

  // Block b + 1 streams in while block b is attended: the prefix tiles' blocks, then the tail's and the chunk's,
  // in two loops whose loads are compiled without each other's branches (2-4% faster than one loop over fp16 tiles,
  // H200); the first block starts with the queries, the first stream block after a prefix's last tile block's
  // barrier, without overlap.
  const int tile_blocks = seq.prefix.num_tiles * (F::G / kBlock);
  auto load_tiles = [&](int block) {
    load_tile_block<F, kDecodedPrefix>(p, seq, kv_head, block, keys(block), values(block));
    cp_async_commit();
  };
  if (tile_blocks > 0) {
    load_tiles(0);
  } else {
    load_stream_block<F>(p, seq, kv_head, 0, chunk_k, chunk_v, keys(0), values(0));
    cp_async_commit();
  }
  if (rotated) rotate_query_rows<D>(qs, warp_row0);
  int b = 0;
  for (; b < tile_blocks; ++b) {
    cp_async_wait<0>();
    __syncthreads();  // block b landed; every warp is done with block b - 1, whose buffer block b + 1 fills
    if (b + 1 < tile_blocks) load_tiles(b + 1);
    attend_visible_block(b);
  }
  if (tile_blocks > 0 && b < num_blocks) {  // into the buffer of block b - 2, done at the last barrier
    load_stream_block<F>(p, seq, kv_head, b, chunk_k, chunk_v, keys(b), values(b));
    cp_async_commit();
  }
  for (; b < num_blocks; ++b) {
    cp_async_wait<0>();
    __syncthreads();
    if (b + 1 < num_blocks) {
      load_stream_block<F>(p, seq, kv_head, b + 1, chunk_k, chunk_v, keys(b + 1), values(b + 1));
      cp_async_commit();
    }
    attend_visible_block(b);
  }

  // ---- O / l, rotated back (as rotated says), fp16 out ----
  __syncthreads();  // the Q/K/V blocks become the output rows
  float* rows = reinterpret_cast<float*>(shared);
  constexpr int kStride = D + 8;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
      for (int n = 0; n < NO; ++n)
        *reinterpret_cast<float2*>(rows + (warp_row0 + 16 * mt + g + 8 * r) * kStride + 8 * n + 2 * m4) =
            make_float2(o[mt][n][2 * r] * inv, o[mt][n][2 * r + 1] * inv);
    }
  __syncwarp();
  for (int r = warp_row0; r < warp_row0 + kRowsPerWarp && row0 + r < seq.chunk_len; ++r) {
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = rows[r * kStride + lane * E + i];
    if (rotated) hadamard_warp<D>(x);
    __half* dst = p.out + (static_cast<size_t>(seq.chunk_begin + row0 + r) * p.num_q_heads + head) * D + lane * E;
#pragma unroll
    for (int i = 0; i < E; i += 2) *reinterpret_cast<uint32_t*>(dst + i) = pack_half2(x[i], x[i + 1]);
  }
}

// The workspace: the rotated chunk's K/V, then the decoded prefix (16-byte aligned: D >= 64).
size_t rotated_chunk_bytes(const KvCacheLayer& cache, int num_rows) {
  if (!cache.rotated()) return 0;
  return size_t{2} * num_rows * cache.num_kv_heads * cache.head_dim() * sizeof(__half);
}

}  // namespace

size_t prefill_attention_workspace_bytes(const KvCacheLayer& cache, int num_rows, int num_prefix_tiles) {
  check_kv_cache_layer(cache, "prefill_attention_workspace_bytes");
  if (num_rows < 0 || num_prefix_tiles < 0)
    throw_error("prefill_attention_workspace_bytes: num_rows " + std::to_string(num_rows) + ", num_prefix_tiles " +
                std::to_string(num_prefix_tiles) + "; expected counts >= 0");
  return rotated_chunk_bytes(cache, num_rows) +
         (cache.layout.code_tile ? dequantized_prefix_bytes(cache, num_prefix_tiles) : 0);
}

void prefill_attention(const KvCacheLayer& cache, const PrefillAttentionArgs& args, void* workspace,
                       cudaStream_t stream) {
  check_kv_cache_layer(cache, "prefill_attention");
  if (args.num_seqs < 0 || args.max_chunk_len < 0)
    throw_error("prefill_attention: " + std::to_string(args.num_seqs) + " sequences, max_chunk_len " +
                std::to_string(args.max_chunk_len) + "; expected counts >= 0");
  if (args.num_seqs == 0 || args.max_chunk_len == 0) return;
  if (args.num_q_heads <= 0 || args.num_q_heads % cache.num_kv_heads != 0)
    throw_error("prefill_attention: " + std::to_string(args.num_q_heads) + " q heads over " +
                std::to_string(cache.num_kv_heads) + " kv heads; expected a positive multiple");
  const long q_blocks = (static_cast<long>(args.max_chunk_len) + kRows - 1) / kRows;
  if (args.num_seqs > 65535 || q_blocks > 65535)
    throw_error("prefill_attention: " + std::to_string(args.num_seqs) + " sequences x " + std::to_string(q_blocks) +
                " query blocks of " + std::to_string(kRows) + " rows exceed the grid limit (65535 each)");
  if (args.num_prefix_tiles < 0)
    throw_error("prefill_attention: num_prefix_tiles " + std::to_string(args.num_prefix_tiles) +
                (args.num_prefix_tiles == -1 ? " (not set)" : "") +
                "; expected the sum of the sequences' prefix tiles (>= 0)");
  if (args.num_rows < args.max_chunk_len)
    throw_error("prefill_attention: num_rows " + std::to_string(args.num_rows) + " below max_chunk_len " +
                std::to_string(args.max_chunk_len) + "; expected the sum of the chunk lengths");
  if (!workspace && prefill_attention_workspace_bytes(cache, args.num_rows, args.num_prefix_tiles) > 0)
    throw_error("prefill_attention: no workspace; expected prefill_attention_workspace_bytes(" +
                std::to_string(args.num_rows) + " rows, " + std::to_string(args.num_prefix_tiles) +
                " prefix tiles) bytes of device memory");
  check_softmax_scale(args.scale, cache.head_dim(), "prefill_attention");
  check_device_memory(args.q, 16, "prefill_attention", "q", "[num_rows][num_q_heads][D] fp16");
  check_device_memory(args.k, 16, "prefill_attention", "k", "[num_rows][num_kv_heads][D] fp16");
  check_device_memory(args.v, 16, "prefill_attention", "v", "[num_rows][num_kv_heads][D] fp16");
  check_device_memory(args.out, 16, "prefill_attention", "out", "[num_rows][num_q_heads][D] fp16");
  check_device_memory(args.seqs, alignof(PrefillSequence), "prefill_attention", "seqs", "[num_seqs] PrefillSequence");
  if (workspace)
    check_device_memory(workspace, 16, "prefill_attention", "workspace",
                        "prefill_attention_workspace_bytes(" + std::to_string(args.num_rows) + " rows, " +
                            std::to_string(args.num_prefix_tiles) + " prefix tiles) bytes");
  const int d = cache.head_dim();
  PrefillParams p;
  p.q = reinterpret_cast<const __half*>(args.q);
  p.k = reinterpret_cast<const __half*>(args.k);
  p.v = reinterpret_cast<const __half*>(args.v);
  p.out = reinterpret_cast<__half*>(args.out);
  p.tiles = cache.blocks;
  p.tails = reinterpret_cast<const __half*>(cache.tails);
  p.seqs = args.seqs;
  p.block_tables = args.block_tables;
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.group = args.num_q_heads / cache.num_kv_heads;
  p.q_blocks = static_cast<int>(q_blocks);
  p.k_stored = p.k;
  p.v_stored = p.v;
  p.scale_log2 = args.scale * kLog2e;
  p.rotated = cache.rotated();
  if (p.rotated) {
    auto* rotated = static_cast<__half*>(workspace);
    const long warps_per_seq = 2L * args.max_chunk_len * cache.num_kv_heads;
    const dim3 grid(static_cast<unsigned>((warps_per_seq * 32 + 255) / 256), args.num_seqs);
    const auto rotate = d == 128 ? rotate_chunk_kernel<128> : rotate_chunk_kernel<64>;
    rotate<<<grid, 256, 0, stream>>>(p.k, p.v, args.seqs, args.num_rows, cache.num_kv_heads, rotated);
    KVARN_CUDA_CHECK(cudaGetLastError());
    p.k_stored = rotated;
    p.v_stored = rotated + static_cast<size_t>(args.num_rows) * cache.num_kv_heads * d;
  }
  if (cache.layout.code_tile) {
    uint8_t* decoded = static_cast<uint8_t*>(workspace) + rotated_chunk_bytes(cache, args.num_rows);
    dequantize_prefix_tiles(cache, args.seqs, args.num_seqs, args.block_tables, args.num_prefix_tiles, decoded,
                            stream);
    p.tiles = decoded;
  }
  with_tile_format(cache, "prefill_attention", [&](auto f) {
    using F = Fp16Tile<decltype(f)::D, decltype(f)::G>;  // code tiles are read decoded
    constexpr bool kDecoded = decltype(f)::kCodes;
    constexpr size_t bytes = shared_bytes<F::D>();
    once_per_device<bool>([] {  // the shared memory the kernel may opt in to is set per device
      KVARN_CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<F, kDecoded>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      return true;
    });
    const dim3 grid(args.num_q_heads, p.q_blocks, args.num_seqs);
    prefill_attention_kernel<F, kDecoded><<<grid, kThreads, bytes, stream>>>(p);
  });
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda
