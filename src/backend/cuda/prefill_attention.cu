// Shape contract: see prefill_attention.h; cache layout: kv_layout.h; tile layout: codec/tile_layout.h.
//
// rotate_chunk_kernel (rotated dtypes): one warp per (row, kv-head, K|V), H_D in registers, fp16 into the
// workspace [K|V][num_rows][H_kv][D]: the chunk's K/V in the space the tiles and tails are stored in.
//
// prefill_attention_kernel: grid (q blocks, q heads, sequences), 256 threads = 8 warps x 16 query rows. The CTA
// serves 128 chunk rows of one q head; q blocks run last-first, so the longest causal rows start earliest. A
// sequence's keys/values form one stream
//     [prefix tiles: num_tiles * G tokens][prefix tail: tail_len tokens][chunk: chunk_len tokens]
// read in blocks of 64 tokens up to the CTA's last row. Each block lands in one of two shared-memory buffers as
// fp16 K[64][D] and V[64][D] in the storage space: a tile block dequantized on chip from its packed codes and
// folded scales (K[t][c] = s_tok[t] (a_K[c] code + z_K[c]), V[t][c] = s_ch[c] (a_V[t] code + z_V[t])), never
// written back to memory, its packed bytes staged by cp.async one block ahead; fp16 tiles, tail and chunk rows
// copied by cp.async one block ahead. 128 rows per CTA halve the dequantization per query row against 64
// (measured 2x faster over a KVarN prefix at equal occupancy: 224 registers per thread allow one CTA per SM).
// Every row's 16-byte chunks are XOR-swizzled by the row's low 3 bits so that the ldmatrix reads of a fragment
// hit distinct banks.
// Per block and warp, on tensor cores: S = Q K^T (Q's fp16 fragments held in registers for the whole CTA; the
// scale applied to S in fp32, as an fp16 product would shift a 100x sink's weight by ~1%), causal mask on the
// chunk's diagonal, online softmax in fp32 (exp2), O += P V with P rounded to fp16. At the end O / l is rotated
// back by H_D (rotated dtypes) and written as fp16.
// FLOPs: 4 D per (query, key) pair the causal mask keeps, plus 2 per dequantized element of each prefix tile
// block, repeated per q head and per 128-row q block (the repeats of a block's bytes are served by L2).
// Bytes: q and out 2 D per row and q head; per CTA, each visible block once (packed bytes for tiles).
#include "backend/cuda/prefill_attention.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hadamard_warp.cuh"
#include "backend/cuda/mma_fragments.cuh"
#include "backend/cuda/tile_formats.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 256, kWarps = 8, kRowsPerWarp = 16, kRows = kWarps * kRowsPerWarp, kBlock = 64;
constexpr float kLog2e = 1.4426950408889634f;

struct PrefillParams {
  const __half* q;
  const __half* k;  // the chunk's K/V in the storage space
  const __half* v;
  __half* out;
  const uint8_t* blocks;
  const __half* tails;
  const PrefillSequence* seqs;
  const int32_t* block_tables;
  int num_q_heads, num_kv_heads, group, q_blocks;
  float scale_log2;
  bool rotated;
};

template <int D>
__global__ void rotate_chunk_kernel(const __half* __restrict__ k, const __half* __restrict__ v, int num_rows,
                                    int num_kv_heads, __half* __restrict__ rotated) {
  constexpr int E = D / 32;
  const long warp = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const long per_tensor = static_cast<long>(num_rows) * num_kv_heads;
  if (warp >= 2 * per_tensor) return;
  const int which = static_cast<int>(warp / per_tensor);  // 0: key, 1: value
  const long vec = warp % per_tensor;
  const __half* src = (which == 0 ? k : v) + vec * D + lane * E;
  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = __half2float(src[i]);
  hadamard_warp<D>(x);
  __half* dst = rotated + (which * per_tensor + vec) * D + lane * E;
#pragma unroll
  for (int i = 0; i < E; ++i) dst[i] = __float2half_rn(x[i]);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared [rows][D] fp16 block.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D * 2 + ((chunk ^ (row & 7)) << 4);
}

// The packed bytes of 64 tokens of a code tile, staged in shared memory (byte offsets; every part 16-byte
// aligned): key codes [D][32 bytes], a_K [D], z_K [D], s_tok [64], value codes [64][D VB / 8], s_ch [D], a_V [64],
// z_V [64].
template <class F>
struct TileStage {
  static constexpr int D = F::D, kKeyRow = kBlock / 2, kValueRow = D * F::VB / 8;
  static constexpr int key_codes = 0, key_scale = key_codes + D * kKeyRow, key_zero = key_scale + 2 * D;
  static constexpr int token_scale = key_zero + 2 * D, value_codes = token_scale + 2 * kBlock;
  static constexpr int channel_scale = value_codes + kBlock * kValueRow, value_scale = channel_scale + 2 * D;
  static constexpr int value_zero = value_scale + 2 * kBlock, bytes = value_zero + 2 * kBlock;
};

template <class F>
constexpr int stage_bytes() {
  if constexpr (F::kCodes) return TileStage<F>::bytes;
  return 0;
}

// Starts copying tokens [first, first + 64) of a code tile into a stage (cp.async, 16-byte pieces).
template <class F>
__device__ void stage_tile_block(const uint8_t* __restrict__ tile, int first, uint8_t* stage) {
  using S = TileStage<F>;
  constexpr codec::TileLayout L = F::L;
  constexpr int D = F::D, kKeyCodes = D * S::kKeyRow / 16, kVector = 2 * D / 16, kTokens = 2 * kBlock / 16;
  constexpr int kValueCodes = kBlock * S::kValueRow / 16;
  constexpr int kTotal = kKeyCodes + 3 * kVector + 3 * kTokens + kValueCodes;
  for (int q = threadIdx.x; q < kTotal; q += kThreads) {
    int i = q, dst;
    const uint8_t* src;
    if (i < kKeyCodes) {
      constexpr int kPieces = S::kKeyRow / 16;
      src = tile + L.key_codes + (i / kPieces) * (F::G / 2) + first / 2 + 16 * (i % kPieces);
      dst = S::key_codes + 16 * i;
    } else if ((i -= kKeyCodes) < kVector) {
      src = tile + L.key_scale + 16 * i, dst = S::key_scale + 16 * i;
    } else if ((i -= kVector) < kVector) {
      src = tile + L.key_zero + 16 * i, dst = S::key_zero + 16 * i;
    } else if ((i -= kVector) < kTokens) {
      src = tile + L.key_token_scale + 2 * first + 16 * i, dst = S::token_scale + 16 * i;
    } else if ((i -= kTokens) < kValueCodes) {
      src = tile + L.value_codes + first * S::kValueRow + 16 * i, dst = S::value_codes + 16 * i;
    } else if ((i -= kValueCodes) < kVector) {
      src = tile + L.value_channel_scale + 16 * i, dst = S::channel_scale + 16 * i;
    } else if ((i -= kVector) < kTokens) {
      src = tile + L.value_scale + 2 * first + 16 * i, dst = S::value_scale + 16 * i;
    } else {
      i -= kTokens;
      src = tile + L.value_zero + 2 * first + 16 * i, dst = S::value_zero + 16 * i;
    }
    cp_async_16(stage + dst, src);
  }
}

// Dequantizes a staged block into the K/V blocks (fp16, storage space): K[t][c] = s_tok[t] (a_K[c] code + z_K[c]),
// V[t][c] = s_ch[c] (a_V[t] code + z_V[t]), in fp32, each rounded once to fp16. The work is laid out so that the
// scales, shift amounts and store addresses are per thread or compile-time, not per element.
template <class F>
__device__ void dequantize_staged(const uint8_t* stage, uint8_t* ks, uint8_t* vs) {
  using S = TileStage<F>;
  constexpr int D = F::D, VB = F::VB, kWarpsPerOctet = D / 64;
  const int tid = threadIdx.x, lane = tid & 31;
  // Keys: a warp takes 32 channel pairs (a lane each) of one 8-token octet. The octet's token scales are one
  // broadcast load; a lane's codes are one word of each of its two channel rows; the 8 tokens are unrolled, so
  // each nibble's shift and each store's swizzled address are constants; the lanes' stores for a token fill one
  // row, on distinct banks.
  for (int slot = tid / 32; slot < 8 * kWarpsPerOctet; slot += kThreads / 32) {
    const int octet = slot / kWarpsPerOctet, c = 2 * ((slot % kWarpsPerOctet) * 32 + lane), chunk = c / 8;
    const uint32_t w0 = *reinterpret_cast<const uint32_t*>(stage + S::key_codes + c * S::kKeyRow + 4 * octet);
    const uint32_t w1 = *reinterpret_cast<const uint32_t*>(stage + S::key_codes + (c + 1) * S::kKeyRow + 4 * octet);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(stage + S::key_scale + 2 * c));
    const float2 z = __half22float2(*reinterpret_cast<const __half2*>(stage + S::key_zero + 2 * c));
    const uint4 scales = *reinterpret_cast<const uint4*>(stage + S::token_scale + 16 * octet);
    const uint32_t scale_pairs[4] = {scales.x, scales.y, scales.z, scales.w};
    uint8_t* rows = ks + 8 * octet * D * 2 + (c % 8) * 2;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&scale_pairs[j / 2]));
      const float s = j % 2 ? pair.y : pair.x;
      const float k0 = s * fmaf(a.x, static_cast<float>((w0 >> (4 * j)) & 15u), z.x);
      const float k1 = s * fmaf(a.y, static_cast<float>((w1 >> (4 * j)) & 15u), z.y);
      *reinterpret_cast<uint32_t*>(rows + j * D * 2 + ((chunk ^ j) << 4)) = pack_half2(k0, k1);  // swizzled()
    }
  }
  // Values: a thread takes a token and 8 channels (one 16-byte chunk of the block), always the same 8 channels, so
  // that their scales are converted once.
  constexpr int kChunks = D / 8;
  static_assert(kThreads % kChunks == 0, "a thread keeps its chunk");
  const int c8 = tid % kChunks;
  float s_ch[8];
  {
    const uint4 raw = *reinterpret_cast<const uint4*>(stage + S::channel_scale + 16 * c8);
    const uint32_t pairs[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&pairs[i]));
      s_ch[2 * i] = f.x, s_ch[2 * i + 1] = f.y;
    }
  }
  const __half* a_v = reinterpret_cast<const __half*>(stage + S::value_scale);
  const __half* z_v = reinterpret_cast<const __half*>(stage + S::value_zero);
  for (int t = tid / kChunks; t < kBlock; t += kThreads / kChunks) {
    const uint8_t* row = stage + S::value_codes + t * S::kValueRow;
    const uint32_t bits = VB == 2 ? *reinterpret_cast<const uint16_t*>(row + 2 * c8)
                                  : *reinterpret_cast<const uint32_t*>(row + 4 * c8);
    const float a = __half2float(a_v[t]), z = __half2float(z_v[t]);
    uint32_t packed[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float c0 = static_cast<float>((bits >> (VB * 2 * i)) & ((1u << VB) - 1));
      const float c1 = static_cast<float>((bits >> (VB * (2 * i + 1))) & ((1u << VB) - 1));
      packed[i] = pack_half2(s_ch[2 * i] * fmaf(a, c0, z), s_ch[2 * i + 1] * fmaf(a, c1, z));
    }
    *reinterpret_cast<uint4*>(vs + swizzled<D>(t, c8)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// Starts loading stream tokens [64 b, 64 b + 64) of one (sequence, kv-head) into the K/V blocks, for every
// block but those of code tiles (staged and dequantized instead); positions past the stream are zeros (a masked
// score times a NaN value would still poison the mma).
template <class F>
__device__ void load_kv_block(const PrefillParams& p, const PrefillSequence& seq, int kv_head, int b, uint8_t* ks,
                              uint8_t* vs) {
  constexpr int D = F::D, G = F::G, kChunks = D / 8;
  const int first = b * kBlock, tile_tokens = seq.prefix.num_tiles * G;
  if (first < tile_tokens) {  // tiles hold whole blocks: G is a multiple of 64
    const int32_t block = p.block_tables[seq.prefix.block_table_offset + first / G];
    const uint8_t* tile = p.blocks + (static_cast<size_t>(block) * p.num_kv_heads + kv_head) * F::L.bytes;
    for (int w = threadIdx.x; w < kBlock * kChunks; w += kThreads) {
      const int t = w / kChunks, c = w % kChunks;
      const size_t src = static_cast<size_t>(first % G + t) * D * 2 + c * 16;
      cp_async_16(ks + swizzled<D>(t, c), tile + F::L.key_codes + src);
      cp_async_16(vs + swizzled<D>(t, c), tile + F::L.value_codes + src);
    }
    return;
  }
  const int tail_end = tile_tokens + seq.prefix.tail_len, end = tail_end + seq.chunk_len;
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
      k = p.k + row * D;
      v = p.v + row * D;
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

// Q, two buffers of K and V blocks, two stages of packed tile bytes; at the end the fp32 output rows (padded by
// 8 floats against bank conflicts) reuse them.
template <class F>
constexpr size_t shared_bytes() {
  return std::max(sizeof(__half) * (kRows + 4 * kBlock) * F::D + 2 * stage_bytes<F>(),
                  sizeof(float) * kRows * (F::D + 8));
}

template <class F>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(const PrefillParams p) {
  constexpr int D = F::D, E = D / 32, KB = D / 16, NT = kBlock / 8, NO = D / 8;
  extern __shared__ __align__(16) uint8_t shared[];
  uint8_t* qs = shared;
  uint8_t* kv_buffers = qs + kRows * D * 2;  // [2][K, V][kBlock][D]
  uint8_t* stages = kv_buffers + 4 * kBlock * D * 2;
  auto keys = [&](int b) { return kv_buffers + (b & 1) * 2 * kBlock * D * 2; };
  auto values = [&](int b) { return keys(b) + kBlock * D * 2; };

  const int q_block = p.q_blocks - 1 - static_cast<int>(blockIdx.x), head = blockIdx.y;
  const PrefillSequence seq = p.seqs[blockIdx.z];
  const int row0 = q_block * kRows;
  if (row0 >= seq.chunk_len) return;
  const int kv_head = head / p.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, g = lane / 4, m4 = lane % 4;
  const int prefix_len = seq.prefix.num_tiles * F::G + seq.prefix.tail_len;

  // ---- this CTA's queries: rotated, scaled, fp16, then A fragments for the whole CTA ----
  for (int r = warp * kRowsPerWarp; r < (warp + 1) * kRowsPerWarp; ++r) {
    float x[E] = {};
    if (row0 + r < seq.chunk_len) {
      const __half* src =
          p.q + (static_cast<size_t>(seq.chunk_begin + row0 + r) * p.num_q_heads + head) * D + lane * E;
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = __half2float(src[i]);
      if (p.rotated) hadamard_warp<D>(x);
    }
    const int byte = lane * E * 2;
#pragma unroll
    for (int i = 0; i < E; i += 2)
      *reinterpret_cast<uint32_t*>(qs + swizzled<D>(r, byte / 16) + byte % 16 + 2 * i) = pack_half2(x[i], x[i + 1]);
  }
  __syncthreads();
  uint32_t qa[KB][4];
#pragma unroll
  for (int kb = 0; kb < KB; ++kb)
    ldmatrix_x4(qa[kb], qs + swizzled<D>(warp * kRowsPerWarp + (lane % 8) + ((lane / 8) % 2) * 8, 2 * kb + lane / 16));

  // Rows g and g + 8 of this warp: their stream positions bound the causal mask.
  const int pos_row0 = prefix_len + row0 + warp * kRowsPerWarp + g;
  const int last = prefix_len + min(row0 + kRows, seq.chunk_len);  // one past the CTA's last visible position
  const int num_blocks = (last + kBlock - 1) / kBlock;

  float o[NO][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0, 0};
  auto attend_block = [&](int b) {
    const uint8_t* ks = keys(b);
    const uint8_t* vs = values(b);
    // ---- S = Q K^T (log2 units) ----
    float s[NT][4] = {};
#pragma unroll
    for (int kb = 0; kb < KB; ++kb)
#pragma unroll
      for (int tp = 0; tp < NT / 2; ++tp) {
        uint32_t kf[4];
        ldmatrix_x4(kf, ks + swizzled<D>(tp * 16 + (lane / 16) * 8 + lane % 8, 2 * kb + (lane / 8) % 2));
        mma_m16n8k16_rows16(s[2 * tp], qa[kb], kf[0], kf[1]);
        mma_m16n8k16_rows16(s[2 * tp + 1], qa[kb], kf[2], kf[3]);
      }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= p.scale_log2;
    const int first = b * kBlock;
    if (first + kBlock - 1 > prefix_len + row0) {  // the block reaches past some row's own position
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (first + 8 * j + 2 * m4 + (e & 1) > pos_row0 + (e / 2) * 8) s[j][e] = -INFINITY;
    }

    // ---- online softmax, rows g (e = 0, 1) and g + 8 (e = 2, 3) ----
    float scale_o[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays at zero
      scale_o[r] = exp2f(m_run[r] - base);
      m_run[r] = m_new;
      l_run[r] *= scale_o[r];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = exp2f(s[j][e] - base);
          l_run[r] += s[j][e];
        }
    }
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= scale_o[0], o[n][1] *= scale_o[0];
      o[n][2] *= scale_o[1], o[n][3] *= scale_o[1];
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      const uint32_t pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                              pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vs + swizzled<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, 2 * np + lane / 16));
        mma_m16n8k16_rows16(o[2 * np], pa, vf[0], vf[1]);
        mma_m16n8k16_rows16(o[2 * np + 1], pa, vf[2], vf[3]);
      }
    }
  };

  int b = 0;
  if constexpr (F::kCodes) {
    // Code tiles: the packed bytes of block b + 1 stream in (cp.async) while block b is dequantized and attended.
    const int tile_blocks = seq.prefix.num_tiles * (F::G / kBlock);
    const int32_t* table = p.block_tables + seq.prefix.block_table_offset;
    auto stage_block = [&](int block) {
      const uint8_t* tile = p.blocks + (static_cast<size_t>(table[block * kBlock / F::G]) * p.num_kv_heads + kv_head) *
                                           F::L.bytes;
      stage_tile_block<F>(tile, (block * kBlock) % F::G, stages + (block & 1) * stage_bytes<F>());
      cp_async_commit();
    };
    if (tile_blocks > 0) stage_block(0);
    for (; b < tile_blocks; ++b) {
      if (b + 1 < tile_blocks) {
        stage_block(b + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // block b staged; every warp is done with block b - 2, the buffer b's dequantization fills
      dequantize_staged<F>(stages + (b & 1) * stage_bytes<F>(), keys(b), values(b));
      __syncthreads();
      attend_block(b);
    }
  }
  // fp16 blocks (fp16 tiles, tail, chunk): block b + 1 streams in while block b is attended.
  if (b < num_blocks) {
    load_kv_block<F>(p, seq, kv_head, b, keys(b), values(b));
    cp_async_commit();
  }
  for (; b < num_blocks; ++b) {
    cp_async_wait<0>();
    __syncthreads();  // block b landed; every warp is done with block b - 1, whose buffer block b + 1 fills
    if (b + 1 < num_blocks) {
      load_kv_block<F>(p, seq, kv_head, b + 1, keys(b + 1), values(b + 1));
      cp_async_commit();
    }
    attend_block(b);
  }

  // ---- O / l, rotated back, fp16 out ----
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    inv[r] = l_run[r] > 0 ? 1.0f / l_run[r] : 0.0f;
  }
  __syncthreads();  // the Q/K/V blocks become the output rows
  float* rows = reinterpret_cast<float*>(shared);
  constexpr int kStride = D + 8;
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<float2*>(rows + (warp * kRowsPerWarp + g + 8 * r) * kStride + 8 * n + 2 * m4) =
          make_float2(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
  __syncwarp();
  for (int r = warp * kRowsPerWarp; r < (warp + 1) * kRowsPerWarp && row0 + r < seq.chunk_len; ++r) {
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = rows[r * kStride + lane * E + i];
    if (p.rotated) hadamard_warp<D>(x);
    __half* dst = p.out + (static_cast<size_t>(seq.chunk_begin + row0 + r) * p.num_q_heads + head) * D + lane * E;
#pragma unroll
    for (int i = 0; i < E; i += 2) *reinterpret_cast<uint32_t*>(dst + i) = pack_half2(x[i], x[i + 1]);
  }
}

}  // namespace

size_t prefill_attention_workspace_bytes(const KvCacheLayer& cache, int num_rows) {
  if (!cache.rotated()) return 0;
  return size_t{2} * num_rows * cache.num_kv_heads * cache.head_dim() * sizeof(__half);
}

void prefill_attention(const KvCacheLayer& cache, const PrefillAttentionArgs& args, void* workspace,
                       cudaStream_t stream) {
  if (args.num_seqs == 0 || args.max_chunk_len == 0) return;
  if (args.num_q_heads % cache.num_kv_heads != 0)
    throw_error("prefill_attention: " + std::to_string(args.num_q_heads) + " q heads over " +
                std::to_string(cache.num_kv_heads) + " kv heads; expected a multiple");
  if (args.num_seqs > 65535 || args.num_q_heads > 65535)
    throw_error("prefill_attention: " + std::to_string(args.num_seqs) + " sequences x " +
                std::to_string(args.num_q_heads) + " q heads exceed the grid limit (65535 each)");
  const int d = cache.head_dim();
  PrefillParams p;
  p.q = reinterpret_cast<const __half*>(args.q);
  p.k = reinterpret_cast<const __half*>(args.k);
  p.v = reinterpret_cast<const __half*>(args.v);
  p.out = reinterpret_cast<__half*>(args.out);
  p.blocks = cache.blocks;
  p.tails = reinterpret_cast<const __half*>(cache.tails);
  p.seqs = args.seqs;
  p.block_tables = args.block_tables;
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.group = args.num_q_heads / cache.num_kv_heads;
  p.q_blocks = (args.max_chunk_len + kRows - 1) / kRows;
  p.scale_log2 = args.scale * kLog2e;
  p.rotated = cache.rotated();
  if (p.rotated && args.num_rows > 0) {
    auto* rotated = static_cast<__half*>(workspace);
    const long warps = 2L * args.num_rows * cache.num_kv_heads;
    const int blocks = static_cast<int>((warps * 32 + 255) / 256);
    if (d == 128)
      rotate_chunk_kernel<128><<<blocks, 256, 0, stream>>>(p.k, p.v, args.num_rows, cache.num_kv_heads, rotated);
    else
      rotate_chunk_kernel<64><<<blocks, 256, 0, stream>>>(p.k, p.v, args.num_rows, cache.num_kv_heads, rotated);
    KVARN_CUDA_CHECK(cudaGetLastError());
    p.k = rotated;
    p.v = rotated + static_cast<size_t>(args.num_rows) * cache.num_kv_heads * d;
  }
  with_tile_format(cache, "prefill_attention", [&](auto f) {
    using F = decltype(f);
    constexpr size_t bytes = shared_bytes<F>();
    static const bool configured = [] {
      KVARN_CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<F>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      return true;
    }();
    (void)configured;
    const dim3 grid(p.q_blocks, args.num_q_heads, args.num_seqs);
    prefill_attention_kernel<F><<<grid, kThreads, bytes, stream>>>(p);
  });
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda
