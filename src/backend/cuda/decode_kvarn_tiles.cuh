// Decode attention over KVarN tiles, one warp per tile, the products on tensor cores with the tokens as the mma's
// rows and the group's heads as its columns.
#pragma once
#include "backend/cuda/decode_kvarn_tile_io.cuh"

namespace kvarn::cuda::decode {

// One tile's step of the online softmax over a lane's scores s (log2 units, relative to `reference`; tile_max:
// their maximum over the lanes of the head): the reference moves only for the first tile or a new maximum, and then
// l and the output (rescale_output(factor)) are rescaled; s becomes 2^s and l gains its sum.
template <int N, class Rescale>
__device__ __forceinline__ void online_softmax_step(float (&s)[N][2], float tile_max, int it, float reference,
                                                    float& m_run, float& l_run, Rescale&& rescale_output) {
  if (__any_sync(0xffffffffu, it == 0 || tile_max > 0)) {
    const float shift = it == 0 ? tile_max : fmaxf(tile_max, 0.0f);
    const float correction = it == 0 ? 0.0f : exp2_approx(-shift);
    m_run = reference + shift;
    l_run *= correction;
    rescale_output(correction);
#pragma unroll
    for (int j = 0; j < N; ++j) s[j][0] -= shift, s[j][1] -= shift;
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[j][e] = exp2_approx(s[j][e]);
      l_run += s[j][e];
    }
}

// One warp reads whole tiles: warp w of the CTA takes tiles w, w + 4, ... of its split through its own slot
// (for_each_warp_tile), so that nothing but a warp barrier separates the tiles, and the per-tile and per-channel
// work (folding a_K into the query, the scales, the values' epilogue) is paid once per 128 tokens. Both products
// have the tile's tokens as the mma's 16 rows and the group's heads in its 8 columns, so that no mma row and no lane
// works for a head that does not exist, however small the group. Lane (g, m) = (lane / 4, lane % 4) holds, of the
// C fragments, columns 2m and 2m + 1: with kLaneHeads = 1 (groups of up to 4 heads: Llama's 32 / 8) head m's
// folded query as an fp16 high part and rest (hi, lo: ~2^-22 relative; the score is c0 + c1), with kLaneHeads = 2
// (groups of 5-8: Qwen3-32B's and Llama-3-70B's 64 / 8) heads 2m and 2m + 1, the folded query as one fp16 operand
// whose rounding fold_key_scales_rounded centres on the tile's largest-scale token (no error in its score, an
// attention sink's; an fp16 query's in the others'): hi + lo would take a second n-tile, 192 instead of 128 mma per
// tile, and measured 0.97-0.99x the speed of the heads-as-rows kernel this replaced (this one: 1.02-1.05x).
// Scores S^T = K q': k-slot i of k-block kb is channel 16 kb + i; m-tile (span pair sp, q): row r < 8 is token
// 64 sp + 4 r + q, row r + 8 is token 64 sp + 32 + 4 r + q; the A operand is the codes read with ldmatrix.trans.
// Values O^T = V^T P^T: k-step = score m-tile (its 16 tokens as k-slots), P^T moved from the scores' C layout into
// the B layout by movmatrix (an 8 x 8 transpose; p a_V in fp16, 2^-12 relative like FlashAttention's fp16 P, which
// moves no score; with hi + lo columns the lo weights are zero); rows g and g + 8 of value m-tile (j, q') are
// channels g NV + (2j) kCPB + q' and g NV + (2j + 1) kCPB + q' (fragment column g of the value rows, bytes 2j and
// 2j + 1, code q' of each). The warps' states are left in the merge buffer (warp_state).
template <class F, int kLaneHeads>
__device__ __forceinline__ void attend_kvarn_tiles(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  static_assert(kLaneHeads == 1 || kLaneHeads == 2);
  constexpr bool kHiLo = kLaneHeads == 1;
  constexpr int D = F::D, G = F::G, VB = F::VB, KBLK = D / 16, NV = D / 8;
  constexpr int kSpanPairs = G / 64, kMTiles = 4 * kSpanPairs;  // score m-tiles = value k-steps
  constexpr int kCodesPerByte = 8 / VB, kColBytes = ValueRows<F>::kColBytes;
  constexpr int kVTiles = NV / 2;  // value m-tiles
  using Rows = ValueRows<F>;
  using Scales = TileScales<F>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);
  auto column_lane = [&](int h) { return 4 * (2 * m4 + (kHiLo ? 0 : h)); };  // a lane of head h's column

  float o[kLaneHeads][NV] = {};  // this lane's heads h, channels g NV + c
  float m_run[kLaneHeads], l_run[kLaneHeads];
#pragma unroll
  for (int h = 0; h < kLaneHeads; ++h) m_run[h] = -FLT_MAX, l_run[h] = 0;
  float s[kLaneHeads][kMTiles][2];  // the tile's weights of head h: [m-tile][row g, row g + 8]
  auto scores = [&](const uint8_t* tile, int it, const float* scales) {
    // ---- A = key codes (fp16 subnormals), B = this lane's column of q' a_K ----
    float acc[kMTiles][4] = {};
    float z_sum = 0;  // the zero-point term of column g's head over this lane's channels
    float centre[4] = {};  // with kLaneHeads = 2: the mma's product for the centre token (fold_key_scales_rounded)
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      uint32_t b[2];
      if constexpr (kHiLo) {
        fold_key_scales<F>(shared, scales, kb, z_sum, b);
      } else {
        fold_key_scales_rounded<F>(query_fragment<F>(shared, kb, g), scales, kb, z_sum, centre, b);
      }
#pragma unroll
      for (int sp = 0; sp < kSpanPairs; ++sp) {
        uint32_t w[2][2];  // [channel half][token span of the pair]
        load_key_codes<F>(tile, key_base, kb, sp, w);
#pragma unroll
        for (int q2 = 0; q2 < 4; ++q2) {
          const uint32_t a[4] = {key_code_operand(w[0][0], q2), key_code_operand(w[0][1], q2),
                                 key_code_operand(w[1][0], q2), key_code_operand(w[1][1], q2)};
          mma_m16n8k16_rows16(acc[4 * sp + q2], a, b[0], b[1]);
        }
      }
    }
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);
    if constexpr (kHiLo) z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 4);

    // ---- scores of this lane's heads, tokens 32 s + 4 g + q, relative to the running maximum: s_tok (c + z / 2^k')
    // - m with 2^k' folded into the staged s_tok (the first tile is taken relative to 0) ----
#pragma unroll
    for (int h = 0; h < kLaneHeads; ++h) {
      const float z = __shfl_sync(0xffffffffu, z_sum, column_lane(h));
      const float z_even = z / kSubnormalScale - (kHiLo ? 0.0f : centre[h]), z_odd = 16.0f * z_even;
      const float reference = it == 0 ? 0.0f : m_run[h];
#pragma unroll
      for (int sp = 0; sp < kSpanPairs; ++sp)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float s_tok[4];
          load_floats(scales + Scales::s_tok + padded(32 * (2 * sp + r) + 4 * g), s_tok);
          auto product = [&](int q2) {
            const float* c = acc[4 * sp + q2] + 2 * r;
            return kHiLo ? c[0] + c[1] : c[h];
          };
#pragma unroll
          for (int q2 = 0; q2 < 4; ++q2) {
            const float dot = (q2 & 1) ? product(q2) - product(q2 - 1) : product(q2);
            s[h][4 * sp + q2][r] = fmaf(s_tok[q2], dot + ((q2 & 1) ? z_odd : z_even), -reference);
          }
        }

      // ---- online softmax of head h over the tile (the 8 lanes of column pair m) ----
      float tile_max = -FLT_MAX;
#pragma unroll
      for (int j = 0; j < kMTiles; ++j) tile_max = fmaxf(tile_max, fmaxf(s[h][j][0], s[h][j][1]));
#pragma unroll
      for (int o2 = 4; o2 < 32; o2 *= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o2));
      online_softmax_step(s[h], tile_max, it, reference, m_run[h], l_run[h], [&](float correction) {
#pragma unroll
        for (int c = 0; c < NV; ++c) o[h][c] *= correction;
      });
    }
  };

  // ---- values: A = value codes (fp16 subnormals), B = (p a_V)^T in fp16 by movmatrix ----
  auto values = [&](const uint8_t* tile, const float* scales) {
    float c[kVTiles][4] = {};
    float pz[kLaneHeads] = {};  // sum_t p_t z_V[t] of head h over this lane's tokens
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
#pragma unroll
          for (int h = 0; h < kLaneHeads; ++h) pz[h] += s[h][kk][r] * z_v[r][q2];
          const float second = kHiLo ? 0.0f : s[kLaneHeads - 1][kk][r] * a_v[r][q2];
          b[r] = movmatrix_trans(pack_half2(s[0][kk][r] * a_v[r][q2], second));
        }
        // Column g of tokens 32 (2 sp + r) + 8 m + 4 e + q (k-slots 2m + e of row half r): v[r][e].
        auto column = [&](int r, int e) {
          return ValueColumn<F>(tile + value_base[e][q2] + 32 * (2 * sp + r) * Rows::kRowBytes);
        };
        const ValueColumn<F> v[2][2] = {{column(0, 0), column(0, 1)}, {column(1, 0), column(1, 1)}};
#pragma unroll
        for (int j = 0; j < kColBytes / 2; ++j) {
          const uint32_t x0a = pair_column_byte(v[0][0], v[0][1], 2 * j);
          const uint32_t x0b = pair_column_byte(v[0][0], v[0][1], 2 * j + 1);
          const uint32_t x1a = pair_column_byte(v[1][0], v[1][1], 2 * j);
          const uint32_t x1b = pair_column_byte(v[1][0], v[1][1], 2 * j + 1);
#pragma unroll
          for (int q3 = 0; q3 < kCodesPerByte; ++q3) {
            const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << (q3 * VB);
            const uint32_t a[4] = {x0a & mask, x0b & mask, x1a & mask, x1b & mask};
            mma_m16n8k16_rows16(c[j * kCodesPerByte + q3], a, b[0], b[1]);
          }
        }
      }
    }
    float s_ch[NV];
    load_floats(scales + Scales::s_ch + padded(g * NV), s_ch);
#pragma unroll
    for (int h = 0; h < kLaneHeads; ++h) {
#pragma unroll
      for (int o2 = 4; o2 < 32; o2 *= 2) pz[h] += __shfl_xor_sync(0xffffffffu, pz[h], o2);
      float pz_k[kCodesPerByte];  // pz in the units of a code at bit k: 2^(k - 24)
#pragma unroll
      for (int q3 = 0; q3 < kCodesPerByte; ++q3)
        pz_k[q3] = pz[h] * (static_cast<float>(1 << (q3 * VB)) / kSubnormalScale);
#pragma unroll
      for (int j = 0; j < kColBytes / 2; ++j)
#pragma unroll
        for (int q3 = 0; q3 < kCodesPerByte; ++q3) {
          const float* cc = c[j * kCodesPerByte + q3];
          const int ca = 2 * j * kCodesPerByte + q3, cb = ca + kCodesPerByte;
          o[h][ca] = fmaf(s_ch[ca], cc[h] + pz_k[q3], o[h][ca]);
          o[h][cb] = fmaf(s_ch[cb], cc[2 + h] + pz_k[q3], o[h][cb]);
        }
    }
  };
  for_each_warp_tile<F, !kHiLo, kMaxGroup>(p, work, shared, scores, values);
#pragma unroll
  for (int h = 0; h < kLaneHeads; ++h) {
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 *= 2) l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], o2);
    const int head = kLaneHeads * m4 + h;
    if (head < work.heads) {
      float* dst = warp_state<D>(shared, warp, head);
#pragma unroll
      for (int c2 = 0; c2 < NV; ++c2) dst[g * NV + c2] = o[h][c2];
      if (g == 0) dst[D] = m_run[h], dst[D + 1] = l_run[h];
    }
  }
  __syncthreads();
}

}  // namespace kvarn::cuda::decode
