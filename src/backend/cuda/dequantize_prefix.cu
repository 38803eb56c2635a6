// Shape contract: see dequantize_prefix.h; tile layout: codec/tile_layout.h.
//
// dequantize_prefix_kernel: one CTA of 256 threads per (slot, kv head), slot-major so that neighbouring CTAs
// write neighbouring memory. The CTA finds the sequence that owns its slot (a binary search over
// prefix_tile_begin), copies the packed tile into shared memory (cp.async, 16-byte pieces) and writes the fp16
// tile: K[t][c] = s_tok[t] (a_K[c] code + z_K[c]), V[t][c] = s_ch[c] (a_V[t] code + z_V[t]), in fp32 and
// rounded once, as the CPU codec computes them. Keys: a warp takes 32 channel pairs (a lane each) of an 8-token
// octet, so that a lane's codes are one word of each of its two channel rows and the warp's stores for a token
// fill 128 contiguous bytes; values: a thread keeps 8 channels (one 16-byte store per token) and their scales.
// Bytes per (slot, kv head): L.bytes read (k4v2, D 128, G 128: 13.5 KB), 4 G D written (64 KB).
#include "backend/cuda/dequantize_prefix.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/mma_fragments.cuh"
#include "backend/cuda/tile_formats.cuh"

#include <cuda_fp16.h>

namespace kvarn::cuda {

namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

template <class F>
__global__ void __launch_bounds__(kThreads)
    dequantize_prefix_kernel(const PrefillSequence* __restrict__ seqs, int num_seqs,
                             const int32_t* __restrict__ block_tables, const uint8_t* __restrict__ blocks,
                             int num_kv_heads, uint8_t* __restrict__ out) {
  constexpr codec::TileLayout L = F::L, P = Fp16Tile<F::D, F::G>::L;
  constexpr int D = F::D, G = F::G, VB = F::VB, kValueRow = D * VB / 8;
  static_assert(L.bytes % 16 == 0 && L.key_token_scale % 16 == 0 && L.value_channel_scale % 16 == 0);
  __shared__ __align__(16) uint8_t tile[L.bytes];
  const int slot = blockIdx.x / num_kv_heads, head = blockIdx.x % num_kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;

  int first = 0, last = num_seqs - 1;  // the owner: the last sequence whose tiles begin at or before the slot
  while (first < last) {
    const int mid = (first + last + 1) / 2;
    if (seqs[mid].prefix_tile_begin <= slot) first = mid;
    else last = mid - 1;
  }
  const PrefillSequence& seq = seqs[first];
  if (slot - seq.prefix_tile_begin >= seq.prefix.num_tiles) return;  // a count past the tiles: not a block to read
  const int32_t block = block_tables[seq.prefix.block_table_offset + slot - seq.prefix_tile_begin];
  const uint8_t* src = blocks + (static_cast<size_t>(block) * num_kv_heads + head) * L.bytes;
  for (int i = threadIdx.x; i < static_cast<int>(L.bytes / 16); i += kThreads) cp_async_16(tile + 16 * i, src + 16 * i);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint8_t* dst = out + (static_cast<size_t>(slot) * num_kv_heads + head) * P.bytes;

  constexpr int kPairGroups = D / 64;  // 64 channels per warp
  for (int unit = warp; unit < (G / 8) * kPairGroups; unit += kWarps) {
    const int octet = unit / kPairGroups, c = 2 * ((unit % kPairGroups) * 32 + lane);
    const uint8_t* codes = tile + L.key_codes + c * (G / 2) + 4 * octet;
    const uint32_t w0 = *reinterpret_cast<const uint32_t*>(codes);
    const uint32_t w1 = *reinterpret_cast<const uint32_t*>(codes + G / 2);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(tile + L.key_scale + 2 * c));
    const float2 z = __half22float2(*reinterpret_cast<const __half2*>(tile + L.key_zero + 2 * c));
    const uint4 scales = *reinterpret_cast<const uint4*>(tile + L.key_token_scale + 16 * octet);
    const uint32_t scale_pairs[4] = {scales.x, scales.y, scales.z, scales.w};
    uint8_t* rows = dst + P.key_codes + (8 * octet * D + c) * 2;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&scale_pairs[j / 2]));
      const float s = j % 2 ? pair.y : pair.x;
      const float k0 = s * fmaf(a.x, static_cast<float>((w0 >> (4 * j)) & 15u), z.x);
      const float k1 = s * fmaf(a.y, static_cast<float>((w1 >> (4 * j)) & 15u), z.y);
      *reinterpret_cast<uint32_t*>(rows + j * D * 2) = pack_half2(k0, k1);
    }
  }

  constexpr int kChunks = D / 8;
  static_assert(kThreads % kChunks == 0, "a thread keeps its 8 channels");
  const int c8 = threadIdx.x % kChunks;
  float s_ch[8];
  {
    const uint4 raw = *reinterpret_cast<const uint4*>(tile + L.value_channel_scale + 16 * c8);
    const uint32_t pairs[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&pairs[i]));
      s_ch[2 * i] = f.x, s_ch[2 * i + 1] = f.y;
    }
  }
  const __half* a_v = reinterpret_cast<const __half*>(tile + L.value_scale);
  const __half* z_v = reinterpret_cast<const __half*>(tile + L.value_zero);
  for (int t = threadIdx.x / kChunks; t < G; t += kThreads / kChunks) {
    const uint8_t* row = tile + L.value_codes + t * kValueRow;
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
    *reinterpret_cast<uint4*>(dst + P.value_codes + (t * D + 8 * c8) * 2) =
        make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

}  // namespace

size_t dequantized_prefix_bytes(const KvCacheLayer& cache, int num_prefix_tiles) {
  check_kv_cache_layer(cache, "dequantized_prefix_bytes");
  if (num_prefix_tiles < 0)
    throw_error("dequantized_prefix_bytes: num_prefix_tiles " + std::to_string(num_prefix_tiles) + "; expected >= 0");
  return size_t{4} * num_prefix_tiles * cache.num_kv_heads * cache.tile_tokens() * cache.head_dim();
}

void dequantize_prefix_tiles(const KvCacheLayer& cache, const PrefillSequence* seqs, int num_seqs,
                             const int32_t* block_tables, int num_prefix_tiles, uint8_t* out, cudaStream_t stream) {
  check_kv_cache_layer(cache, "dequantize_prefix_tiles");
  if (num_seqs < 0 || num_prefix_tiles < 0)
    throw_error("dequantize_prefix_tiles: num_seqs " + std::to_string(num_seqs) + ", num_prefix_tiles " +
                std::to_string(num_prefix_tiles) + "; expected counts >= 0");
  if (num_seqs == 0 || num_prefix_tiles == 0) return;
  if (!cache.layout.code_tile) throw_error("dequantize_prefix_tiles: the cache holds fp16 tiles, not code tiles");
  const long ctas = static_cast<long>(num_prefix_tiles) * cache.num_kv_heads;
  if (ctas > 0x7fffffffL)
    throw_error("dequantize_prefix_tiles: num_prefix_tiles " + std::to_string(num_prefix_tiles) + " x " +
                std::to_string(cache.num_kv_heads) + " kv heads = " + std::to_string(ctas) +
                " CTAs exceed the grid limit (2^31 - 1)");
  check_device_memory(seqs, alignof(PrefillSequence), "dequantize_prefix_tiles", "seqs", "[num_seqs] PrefillSequence");
  check_device_memory(out, 16, "dequantize_prefix_tiles", "out",
                      "dequantized_prefix_bytes(" + std::to_string(num_prefix_tiles) + " tiles) bytes");
  check_device_memory(cache.blocks, 16, "dequantize_prefix_tiles", "cache.blocks", "[num_blocks][num_kv_heads] tiles");
  with_tile_format(cache, "dequantize_prefix_tiles", [&](auto f) {
    using F = decltype(f);
    if constexpr (F::kCodes)
      dequantize_prefix_kernel<F><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
          seqs, num_seqs, block_tables, cache.blocks, cache.num_kv_heads, out);
  });
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda
