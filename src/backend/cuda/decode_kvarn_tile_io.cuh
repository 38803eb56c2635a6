// Decode attention over KVarN tiles, the tile in shared memory: each warp's slot, the copy of a tile's two halves
// into it (swizzled against bank conflicts), the fp32 staging of its scales and of the queries, the reads of its
// key codes, and the loop of a warp over its tiles.
#pragma once
#include "backend/cuda/decode_common.cuh"

#include <algorithm>

namespace kvarn::cuda::decode {

// fp32 copies of the scales of the tile a warp reads, as its products read them: a_K, z_K (with centre codes
// z_K + a_K x) and centre_K (x: the codes of the tile's largest-scale token as fp16 subnormal pairs, a lane's
// four registers of an mma's A operand whose rows are all x, so that one 16-byte load fills the mma's register
// quad; see fold_key_scales_rounded) in fragment order (stage_key_scales), then in
// padded() order s_tok_K[t] * 2^24 or 2^20 (even / odd token: the code's bit in its byte, see the scores), a_V[t],
// z_V[t], and s_ch_V[c] * 2^(24 - k) (k: the bit of channel c's code in its byte).
template <class F>
struct TileScales {
  static constexpr int a_k = 0, z_k = F::D, centre_k = 2 * F::D, s_tok = 3 * F::D, a_v = s_tok + padded_size(F::G),
                       z_v = a_v + padded_size(F::G), s_ch = z_v + padded_size(F::G), floats = s_ch + padded_size(F::D);
  static_assert(s_tok % 4 == 0 && a_v % 4 == 0 && z_v % 4 == 0 && s_ch % 4 == 0, "float4 rows");
};

// Shared memory of a KVarN CTA: the queries of its kHeads heads in fragment order (for the whole CTA), then per warp
// one tile slot and its TileScales. One slot per warp, refilled in two halves (keys while the values are read,
// values while the next keys are), keeps a CTA of 8 heads at ~73 KB, so that 3 CTAs (12 warps) fit on an SM. The
// final merge reuses it all.
template <class F, int kHeads = kMaxGroup>
struct KvarnSharedLayout {
  static constexpr size_t query = 0;
  static constexpr size_t warp_regions = sizeof(float) * kHeads * F::D;
  static constexpr size_t slot_bytes = (F::L.bytes + 15) / 16 * 16;
  static constexpr size_t warp_region = slot_bytes + sizeof(float) * TileScales<F>::floats;
  static constexpr size_t bytes = std::max(warp_regions + kWarps * warp_region, merge_buffer_bytes(F::D));
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

// A lane's bytes of one value-code row: its fragment column's ValueRows::kColBytes bytes, as words (src: their
// address in a slot, value_code_offsets).
template <class F>
struct ValueColumn {
  static constexpr int kWords = (ValueRows<F>::kColBytes + 3) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ explicit ValueColumn(const uint8_t* src) {
    if constexpr (ValueRows<F>::kColBytes == 2) {
      w[0] = *reinterpret_cast<const uint16_t*>(src);
    } else if constexpr (ValueRows<F>::kColBytes == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(src);
    } else {
      const uint2 x = *reinterpret_cast<const uint2*>(src);
      w[0] = x.x, w[1] = x.y;
    }
  }
};

// Byte b of two rows' columns in bytes 0 and 2 of a register: the codes of two tokens, an mma operand after a mask.
template <class F>
__device__ __forceinline__ uint32_t pair_column_byte(const ValueColumn<F>& x, const ValueColumn<F>& y, int b) {
  return __byte_perm(x.w[b / 4], y.w[b / 4], pair_selector(b % 4));
}

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

  // The key half of the tile: key codes and key scales, [0, value_codes).
  __device__ __forceinline__ void keys(uint8_t* slot, const uint8_t* __restrict__ tile) const {
    const uint8_t* src = tile + 16 * lane;
#pragma unroll
    for (int k = 0; k < kKeyChunks / 32; ++k) cp_async_16(slot + key_offset + 512 * k, src + 512 * k);
    copy_plain<static_cast<int>(L.key_scale), static_cast<int>(L.value_codes)>(slot, src);
  }

  // The value half: value codes and value scales, [value_codes, bytes).
  __device__ __forceinline__ void values(uint8_t* slot, const uint8_t* __restrict__ tile) const {
    const uint8_t* src = tile + 16 * lane;
#pragma unroll
    for (int k = 0; k < (kValueChunks + 31) / 32; ++k)
      if (kValueChunks % 32 == 0 || lane + 32 * k < kValueChunks)
        cp_async_16(slot + L.value_codes + value_offset[((kRowsPerRound * k) >> ValueRows<F>::kGroupShift) & 3] +
                        512 * k,
                    src + L.value_codes + 512 * k);
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

// Four fp16 scales per lane (lanes with 4 lane < n) as fp32, times factor(index), to `to` in padded() order.
template <class Factor>
__device__ __forceinline__ void stage_scale_run(const uint8_t* from, float* to, int n, int lane, Factor&& factor) {
  if (4 * lane < n) {
    const uint2 raw = *reinterpret_cast<const uint2*>(from + 8 * lane);
    const __half* h = reinterpret_cast<const __half*>(&raw);
    float4 f;
    float* x = &f.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = __half2float(h[j]) * factor(4 * lane + j);
    *reinterpret_cast<float4*>(to + padded(4 * lane)) = f;
  }
}

// The token of a tile with the largest key token scale (the first of equals), the same answer in every lane.
template <class F>
__device__ __forceinline__ int largest_scale_token(const uint8_t* tile, int lane) {
  float largest = 0;  // of this lane's 4 token scales' magnitudes (their bits order as unsigned integers)
  int mine = 0;
  if (4 * lane < F::G) {
    const uint2 raw = *reinterpret_cast<const uint2*>(tile + F::L.key_token_scale + 8 * lane);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    const float x[4] = {fabsf(a.x), fabsf(a.y), fabsf(b.x), fabsf(b.y)};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (x[j] > largest) largest = x[j], mine = j;
  }
  const uint32_t bits = __float_as_uint(largest), tile_largest = __reduce_max_sync(0xffffffffu, bits);
  const int holder = __ffs(__ballot_sync(0xffffffffu, bits == tile_largest)) - 1;
  return 4 * holder + __shfl_sync(0xffffffffu, mine, holder);
}

// The codes of token t in key channels c, c + 1, c + 8, c + 9 of a tile in a slot (c = 16 kb + 2m, a lane's
// channels in fragment order). WarpTileCopy swizzles a row's chunks by the row's (c * chunks per row / 8) mod
// (chunks per row), the same for the four rows, so the token sits at one offset in each.
template <class F>
__device__ __forceinline__ uint2 key_codes_of_token(const uint8_t* tile, int c, unsigned t) {
  constexpr unsigned kRowChunks = F::G / 32, kRowBytes = F::G / 2;
  const unsigned chunk = (t / 32) ^ ((static_cast<unsigned>(c) * kRowChunks / 8) & (kRowChunks - 1));
  const uint8_t* row = tile + c * kRowBytes + 16 * chunk + (t / 2) % 16;
  const unsigned shift = 4 * (t & 1);
  auto code = [&](int row_offset) { return (static_cast<unsigned>(row[row_offset * kRowBytes]) >> shift) & 15; };
  return make_uint2(code(0) | code(1) << 16, code(8) | code(9) << 16);  // as fp16 subnormal pairs
}

// The key half's scales as TileScales: a_K, z_K (with kCentreCodes z_K + a_K x and the codes x of the tile's
// largest-scale token, for fold_key_scales_rounded) in fragment order (lane l: k-block l / 4, m = l % 4, its
// channels 16 kb + 2m, 2m + 1, 2m + 8, 2m + 9, i.e. k-slots 2m, 2m + 1, 2m + 8, 2m + 9) and s_tok_K.
template <class F, bool kCentreCodes>
__device__ __forceinline__ void stage_key_scales(const uint8_t* tile, float* scales, int lane) {
  using S = TileScales<F>;
  const int centre = kCentreCodes ? largest_scale_token<F>(tile, lane) : 0;
  if (lane < F::D / 4) {
    const __half2* ak = reinterpret_cast<const __half2*>(tile + F::L.key_scale);
    const __half2* zk = reinterpret_cast<const __half2*>(tile + F::L.key_zero);
    const int c2 = 8 * (lane / 4) + lane % 4;  // half2 index of channel 16 kb + 2m
    const float2 a0 = __half22float2(ak[c2]), a1 = __half22float2(ak[c2 + 4]);
    float2 z0 = __half22float2(zk[c2]), z1 = __half22float2(zk[c2 + 4]);
    if constexpr (kCentreCodes) {
      const uint2 x = key_codes_of_token<F>(tile, 2 * c2, centre);
      reinterpret_cast<uint4*>(scales + S::centre_k)[lane] = make_uint4(x.x, x.x, x.y, x.y);
      z0.x = fmaf(a0.x, static_cast<float>(x.x & 0xffff), z0.x);
      z0.y = fmaf(a0.y, static_cast<float>(x.x >> 16), z0.y);
      z1.x = fmaf(a1.x, static_cast<float>(x.y & 0xffff), z1.x);
      z1.y = fmaf(a1.y, static_cast<float>(x.y >> 16), z1.y);
    }
    reinterpret_cast<float4*>(scales + S::a_k)[lane] = make_float4(a0.x, a0.y, a1.x, a1.y);
    reinterpret_cast<float4*>(scales + S::z_k)[lane] = make_float4(z0.x, z0.y, z1.x, z1.y);
  }
  stage_scale_run(tile + F::L.key_token_scale, scales + S::s_tok, F::G, lane,
                  [](int t) { return (t & 1) ? kSubnormalScale / 16 : kSubnormalScale; });
}

// The value half's scales as TileScales: a_V, z_V and s_ch_V.
template <class F>
__device__ __forceinline__ void stage_value_scales(const uint8_t* tile, float* scales, int lane) {
  using S = TileScales<F>;
  constexpr int kCodesPerByte = 8 / F::VB;
  stage_scale_run(tile + F::L.value_scale, scales + S::a_v, F::G, lane, [](int) { return 1.0f; });
  stage_scale_run(tile + F::L.value_zero, scales + S::z_v, F::G, lane, [](int) { return 1.0f; });
  stage_scale_run(tile + F::L.value_channel_scale, scales + S::s_ch, F::D, lane,
                  [](int c) { return static_cast<float>(1 << (24 - (c % kCodesPerByte) * F::VB)); });
}

// The key codes of k-block kb for the tokens of pass `pass` (64 pass .. 64 pass + 63) through one ldmatrix.trans
// (key_base: key_row_offset): w[h][s] holds channels 16 kb + 8h + 2m, + 1 (register halves) of tokens
// 64 pass + 32 s + 4 g .. + 3 (4 bits each). Span 2 pass + s sits in chunk (s ^ swizzle) ^ 2 pass of its row: bits
// 4-5 of the row offset.
template <class F>
__device__ __forceinline__ void load_key_codes(const uint8_t* tile, int key_base, int kb, int pass,
                                               uint32_t (&w)[2][2]) {
  uint32_t x[4];
  ldmatrix_x4_trans(x, tile + (key_base ^ (32 * pass)) + 16 * kb * (F::G / 2));
  w[0][0] = x[0], w[0][1] = x[1], w[1][0] = x[2], w[1][1] = x[3];
}

// The mma operand of code q2 (token 4 g + q2 of its span) in a word of load_key_codes, as fp16 subnormals
// (code * 2^-24). An odd code comes with its even neighbour, the byte (even + 16 odd) whole: the fp16 bits 0-10
// are linear, so the mma's product for the odd token is its product less the even one's, and a byte needs one
// mask instead of two (the high bytes come down by one byte_perm that zeroes the rest). Per tile 64 fewer
// instructions of ~1,600-1,900; the subtraction of the accumulators loses ~4 of fp32's 24 bits.
__device__ __forceinline__ uint32_t key_code_operand(uint32_t w, int q2) {
  const uint32_t bytes = q2 < 2 ? w & 0x00ff00ffu : __byte_perm(w, 0, 0x4341);
  return (q2 & 1) ? bytes : bytes & 0x000f000fu;
}

// This lane's ldmatrix row address in a tile's key codes for pass 0: row lane % 8 of matrix lane / 8 = (channel
// half h, 32-token span s) = (lane / 16, lane / 8 % 2).
template <class F>
__device__ __forceinline__ int key_row_offset(int lane) {
  constexpr int kKeyRowChunks = F::G / 32;
  const int r = lane % 8, h = lane / 16, s = (lane / 8) % 2;
  return (8 * h + r) * (F::G / 2) + 16 * (s ^ ((r / (8 / kKeyRowChunks)) & (kKeyRowChunks - 1)));
}

// Stages the rotated queries of the CTA's heads times scale_log2 (log2 units) in fragment order, for the whole CTA:
// float4 (kb, head, m) holds the head's channels 16 kb + 2m, 2m + 1, 2m + 8, 2m + 9 (heads past work.heads: zero), so
// that 8 heads' fragments of a k-block are 512 consecutive bytes. Kept in shared memory rather than in 32 registers
// per thread, which would not leave 3 CTAs per SM.
template <class F, int kHeads = kMaxGroup>
__device__ __forceinline__ void stage_query_fragments(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  float* fragments = reinterpret_cast<float*>(shared + KvarnSharedLayout<F, kHeads>::query);
  load_rotated_queries<F::D, kHeads>(p, work.partial_row, work.heads, [&](int h, int c, float x) {
    const int r = c % 16, m = (r % 8) / 2, e = (r & 1) + 2 * (r / 8);
    fragments[(((c / 16) * kHeads + h) * 4 + m) * 4 + e] = x * p.scale_log2;
  });
  __syncthreads();
}

// This lane's query fragment of k-block kb for `head` (stage_query_fragments).
template <class F, int kHeads = kMaxGroup>
__device__ __forceinline__ float4 query_fragment(const uint8_t* shared, int kb, int head) {
  return reinterpret_cast<const float4*>(shared + KvarnSharedLayout<F, kHeads>::query)[(kb * kHeads + head) * 4 +
                                                                                       threadIdx.x % 4];
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

// One lane's B fragment of k-block kb with head g / 2's q' a_K as fp16 hi (g even) or lo (g odd) pairs, hi + lo
// ~2^-22 relative, at its channels 2m, 2m + 1 (pair 0) and 2m + 8, 2m + 9 (pair 1). The head's two lanes (4 apart)
// share the work: the even lane folds pair 0, the odd lane pair 1, each splits its pair and sends the other lane
// the half that lane's column needs (8 fewer instructions per k-block than both lanes folding all four). Adds the
// pair's q' z_K to z_sum: the head's sum is over the lanes of both columns. scales: staged by stage_key_scales.
template <class F>
__device__ __forceinline__ void fold_key_scales(const uint8_t* shared, const float* scales, int kb, float& z_sum,
                                                uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, m4 = lane % 4, odd = g & 1;
  const int pair = 2 * (4 * kb + m4) + odd;  // float2 index in fragment order
  const float2* fragments = reinterpret_cast<const float2*>(shared + KvarnSharedLayout<F>::query);
  const float2 q = fragments[2 * ((kb * kMaxGroup + g / 2) * 4 + m4) + odd];
  const float2 av = reinterpret_cast<const float2*>(scales + TileScales<F>::a_k)[pair];
  const float2 zv = reinterpret_cast<const float2*>(scales + TileScales<F>::z_k)[pair];
  z_sum = fmaf(q.y, zv.y, fmaf(q.x, zv.x, z_sum));
  uint32_t hi, lo;
  split_half2(q.x * av.x, q.y * av.y, hi, lo);
  const uint32_t other = __shfl_xor_sync(0xffffffffu, odd ? hi : lo, 4);
  b[0] = odd ? other : hi;
  b[1] = odd ? lo : other;
}

// One lane's q' a_K of k-block kb at its channels (pairs 0 and 1, as fold_key_scales) as one fp16 pair each, b, with
// the rounding centred on the tile's largest-scale token: the mma's sum_c b_c code_c misses sum_c r_c code_c (r =
// q' a_K - b, the rounding's rest), of which the score gets back sum_c r_c x_c (x: that token's codes) exactly, so
// that it misses only sum_c r_c (code_c - x_c): nothing for that token, and for the others 2^-12 of their distance
// from it, times their smaller token scales. An attention sink is that token: its score, ~100x the others', would
// take ~100x their error (beside a 100x sink, outputs moved by up to 2.3e-2 with the rounding centred on each
// channel's zero code instead, 5.5e-2 with r x left out; 1.5e-3 with it). sum_c r_c x_c is the difference of two
// sums, both formed without r: z_sum gains q' (z_K + a_K x) (the staged z_K), and `centre`, an mma accumulator
// whose columns are the heads of B, gains sum_c b_c x_c (x as fp16 subnormals in every row of A, so in the units of
// the scores' accumulators): 15 instructions per k-block instead of 26 with r formed and multiplied per channel.
template <class F>
__device__ __forceinline__ void fold_key_scales_rounded(const float4 q, const float* scales, int kb, float& z_sum,
                                                        float (&centre)[4], uint32_t (&b)[2]) {
  const int m4 = threadIdx.x % 4;
  const float4 av = reinterpret_cast<const float4*>(scales + TileScales<F>::a_k)[4 * kb + m4];
  const float4 zv = reinterpret_cast<const float4*>(scales + TileScales<F>::z_k)[4 * kb + m4];
  const uint4 x = reinterpret_cast<const uint4*>(scales + TileScales<F>::centre_k)[4 * kb + m4];
  const __half2 h01 = __floats2half2_rn(q.x * av.x, q.y * av.y), h23 = __floats2half2_rn(q.z * av.z, q.w * av.w);
  // One fma per channel into the running sum (a separate sum of products and an add issued one more per k-block,
  // and its temporaries kept a 32-byte stack on the Qwen path's kernel bounded for 3 CTAs per SM).
  z_sum = fmaf(q.w, zv.w, fmaf(q.z, zv.z, fmaf(q.y, zv.y, fmaf(q.x, zv.x, z_sum))));
  b[0] = *reinterpret_cast<const uint32_t*>(&h01), b[1] = *reinterpret_cast<const uint32_t*>(&h23);
  const uint32_t a[4] = {x.x, x.y, x.z, x.w};
  mma_m16n8k16_rows16(centre, a, b[0], b[1]);
}

// Stages the queries of the CTA's heads (stage_query_fragments, room for kHeads) while the first tile's keys stream
// in, then runs scores(tile, it,
// scales) and values(tile, scales) over this warp's tiles of the CTA's split (tiles w, w + 4, ... for warp w) in the
// warp's one slot: the next tile's key half streams in while this tile's values are read, its value half while the
// next keys are; each half's scales are staged as TileScales before its phase. In the CTAs of the launch's first
// wave the first tile's values are asked for only once its keys are in: those CTAs all ask for their first tiles at
// once, and with both halves in that queue a warp's keys came as late as the whole first round (~20 MB on 132 SMs).
// Side by side (docs/benchmarks.md): 1.01-1.06x at batch 8 x 8K and 1 x 8K-32K, on H100 and H200. Later CTAs start
// one by one as slots free up and ask for both halves at once (values behind the keys would wait in the open).
// Then waits for every warp (the slots become the merge buffer).
template <class F, bool kCentreCodes, int kHeads, class Scores, class Values>
__device__ __forceinline__ void for_each_warp_tile(const DecodeParams& p, const CtaWork& work, uint8_t* shared,
                                                   Scores&& scores, Values&& values) {
  using Layout = KvarnSharedLayout<F, kHeads>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int32_t* table = p.block_tables + work.seq.block_table_offset;
  const int num = work.end_tile - work.first_tile;
  const int mine = num > warp ? (num - warp + kWarps - 1) / kWarps : 0;
  uint8_t* slot = shared + Layout::warp_regions + warp * Layout::warp_region;
  float* scales = reinterpret_cast<float*>(slot + Layout::slot_bytes);
  auto block_of = [&](int i) { return i < mine ? table[work.first_tile + warp + i * kWarps] : 0; };
  auto tile_bytes = [&](int32_t block) {
    return p.blocks + (static_cast<size_t>(block) * p.num_kv_heads + work.head) * F::L.bytes;
  };
  const WarpTileCopy<F> copy(lane);
  const bool keys_first = static_cast<int>(blockIdx.x) < p.first_wave_ctas;
  const int32_t first = block_of(0);
  if (mine > 0) copy.keys(slot, tile_bytes(first));
  cp_async_commit();
  if (!keys_first && mine > 0) copy.values(slot, tile_bytes(first));
  cp_async_commit();
  wait_for_previous_kernel();
  stage_query_fragments<F, kHeads>(p, work, shared);  // while the first keys stream in
  for (int it = 0; it < mine; ++it) {
    // The next tile's block, read a tile before its copies need it (read at the copies, it stalled the warp).
    const int32_t next = block_of(it + 1);
    if (it == 0 && keys_first) {
      cp_async_wait<0>();  // the first tile's keys; now its values
      copy.values(slot, tile_bytes(first));
      cp_async_commit();
    } else {
      cp_async_wait<1>();  // this tile's keys (its values may still stream)
    }
    __syncwarp();
    stage_key_scales<F, kCentreCodes>(slot, scales, lane);
    __syncwarp();
    scores(slot, it, scales);
    __syncwarp();  // the key half is read: the next tile's streams in
    if (it + 1 < mine) copy.keys(slot, tile_bytes(next));
    cp_async_commit();
    cp_async_wait<1>();  // this tile's values
    __syncwarp();
    stage_value_scales<F>(slot, scales, lane);
    __syncwarp();
    values(slot, scales);
    __syncwarp();
    // The address again, not kept from the keys' copy: held across values() it took the Llama path 3 registers
    // more and ran it 0.991-0.996x at batch 8-32 (docs/benchmarks.md, seventeenth session).
    if (it + 1 < mine) copy.values(slot, tile_bytes(next));
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();
}

}  // namespace kvarn::cuda::decode
