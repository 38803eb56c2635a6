// Decode attention over KVarN tiles, one warp per tile, the products on tensor cores: for up to 8 heads
// (attend_kvarn_tiles) the scores with the heads as the mma's rows and the values with them as its columns; for up
// to 4 heads (attend_kvarn_tiles_few_heads) the heads are the columns of both.
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
// work (folding a_K into the query, the scales, the values' epilogue) is paid once per 128 tokens.
// Scores: lane (g, m) = (lane / 4, lane % 4) owns q head g (rows g: fp16 high part of q' a_K, g + 8: low part) and
// fragment columns 2m, 2m + 1 of every n-tile. k-slot i of k-block kb is channel 16 kb + i; column x of score
// n-tile j = 4 s + q is token 32 s + 4 x + q. ldmatrix.trans of 8 channel rows x 16 bytes (32 tokens) gives a
// lane the 16-bit groups x = g of channels 2m and 2m + 1 in the two halves of a register: the 4 codes of tokens
// 32 s + 4 g + q, q = 0..3, at bits 4q, a B operand after one mask (q = 0, 1) or a shift and a mask (q = 2, 3).
// Values, transposed (see `values`), so that all 16 mma rows work: half as many mma as with the heads as rows,
// whose rows 8-15 would hold nothing (p a_V is one fp16 operand: its rounding, 2^-12 relative like FlashAttention's
// fp16 P, moves no score, unlike that of q' a_K).
template <class F>
__device__ __forceinline__ void attend_kvarn_tiles(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  constexpr int D = F::D, G = F::G, VB = F::VB, NT = G / 8, KBLK = D / 16, KK = G / 16, NV = D / 8;
  constexpr int kCodesPerByte = 8 / VB;
  using Rows = ValueRows<F>;
  using Scales = TileScales<F>;
  const int lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);

  float o[NV][2] = {};  // heads 2m + h, channels g NV + i (the values' C layout)
  float m_run = -FLT_MAX, l_run = 0;  // head g's
  float s[NT][2];  // the tile's weights of head g: n-tile 4 span + q, tokens 32 span + 8m + 4e + q
  auto scores = [&](const uint8_t* tile, int it, const float* scales) {
    // ---- A = q' a_K (hi / lo), B = key codes as fp16 subnormals code * 2^k * 2^-24 ----
    float acc[NT][4] = {};
    float z_sum = 0;  // sum_c q'_c z_K[c] over this lane's channels
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      uint32_t hi[2], lo[2];
      fold_key_scales<F>(query_fragment<F>(shared, kb, g), scales, kb, z_sum, hi, lo);
      const uint32_t a[4] = {hi[0], lo[0], hi[1], lo[1]};  // rows g: hi, g + 8: lo
#pragma unroll
      for (int pass = 0; pass < G / 64; ++pass) {
        uint32_t w[2][2];  // [channel half][token span of the pass]
        load_key_codes<F>(tile, key_base, kb, pass, w);
#pragma unroll
        for (int s2 = 0; s2 < 2; ++s2) {
          const int span = 2 * pass + s2;
          const uint32_t x0 = w[0][s2], x1 = w[1][s2], y0 = x0 >> 8, y1 = x1 >> 8;
          mma_m16n8k16_rows16(acc[4 * span], a, x0 & 0x000f000fu, x1 & 0x000f000fu);
          mma_m16n8k16_rows16(acc[4 * span + 1], a, x0 & 0x00f000f0u, x1 & 0x00f000f0u);
          mma_m16n8k16_rows16(acc[4 * span + 2], a, y0 & 0x000f000fu, y1 & 0x000f000fu);
          mma_m16n8k16_rows16(acc[4 * span + 3], a, y0 & 0x00f000f0u, y1 & 0x00f000f0u);
        }
      }
    }
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);

    // ---- scores in log2 units, relative to the running maximum: s_tok (acc_hi + acc_lo + z / 2^k') - m with
    // 2^k' folded into the staged s_tok (the first tile is taken relative to 0) ----
    const float reference = it == 0 ? 0.0f : m_run;
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
    online_softmax_step(s, tile_max, it, reference, m_run, l_run, [&](float correction) {
      const float c0 = __shfl_sync(0xffffffffu, correction, 8 * m4);  // heads 2m, 2m + 1
      const float c1 = __shfl_sync(0xffffffffu, correction, 8 * m4 + 4);
#pragma unroll
      for (int i = 0; i < NV; ++i) o[i][0] *= c0, o[i][1] *= c1;
    });
  };

  // ---- values, transposed (O^T = V^T P^T): channels as the mma's rows, the 8 heads as its columns. B = p a_V in
  // fp16: lane (g, m)'s weights of head g at the columns 2m, 2m + 1 of score n-tiles 2kk and 2kk + 1 are, as they
  // stand, the B fragment of k-step kk for column g. A = value codes: rows g and g + 8 of m-tile i / 2 are the
  // channels g NV + i and g NV + i + 1 (codes q, q + 1 of one byte of fragment column g). ----
  auto values = [&](const uint8_t* tile, const float* scales) {
    uint32_t b[KK][2];  // k-slots 2m, 2m + 1 and 2m + 8, 2m + 9 of column g
    float pz = 0;       // sum_t p_t z_V[t] of head g over this lane's tokens
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
      b[kk][0] = pack_half2(pa[0][0], pa[0][1]), b[kk][1] = pack_half2(pa[1][0], pa[1][1]);
    }
    float c[NV / 2][4] = {};  // m-tile i / 2: channels g NV + i (c0, c1), + 1 (c2, c3); heads 2m, 2m + 1
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      // This column of tokens 32 (kk / 2) + 8 m + 4 e + 2 (kk % 2) + jj: v[jj][e].
      auto column = [&](int jj, int e) {
        return ValueColumn<F>(tile + value_base[e][2 * (kk % 2) + jj] + (kk / 2) * 32 * Rows::kRowBytes);
      };
      const ValueColumn<F> v[2][2] = {{column(0, 0), column(0, 1)}, {column(1, 0), column(1, 1)}};
#pragma unroll
      for (int byte = 0; byte < Rows::kColBytes; ++byte) {
        const uint32_t x_ab = pair_column_byte(v[0][0], v[0][1], byte);
        const uint32_t x_cd = pair_column_byte(v[1][0], v[1][1], byte);
#pragma unroll
        for (int q2 = 0; q2 < kCodesPerByte; q2 += 2) {
          const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << (q2 * VB), mask1 = mask << VB;
          const uint32_t a[4] = {x_ab & mask, x_ab & mask1, x_cd & mask, x_cd & mask1};
          mma_m16n8k16_rows16(c[(byte * kCodesPerByte + q2) / 2], a, b[kk][0], b[kk][1]);
        }
      }
    }
    pz += __shfl_xor_sync(0xffffffffu, pz, 1);
    pz += __shfl_xor_sync(0xffffffffu, pz, 2);
    const float pz_heads[2] = {__shfl_sync(0xffffffffu, pz, 8 * m4), __shfl_sync(0xffffffffu, pz, 8 * m4 + 4)};
    float s_ch[NV];
    load_floats(scales + Scales::s_ch + padded(g * NV), s_ch);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      // pz in the units of channel i's code, at bit k of its byte: 2^(k - 24)
      const float unit = static_cast<float>(1 << ((i % kCodesPerByte) * VB)) / kSubnormalScale;
#pragma unroll
      for (int h = 0; h < 2; ++h) o[i][h] = fmaf(s_ch[i], c[i / 2][2 * (i % 2) + h] + pz_heads[h] * unit, o[i][h]);
    }
  };
  for_each_warp_tile<F>(p, work, shared, scores, values);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int h = 0; h < 2; ++h)
    if (2 * m4 + h < p.group) {
      float* dst = warp_state<D>(shared, warp, 2 * m4 + h);
#pragma unroll
      for (int i = 0; i < NV; ++i) dst[g * NV + i] = o[i][h];
    }
  if (m4 == 0 && g < p.group) {
    float* dst = warp_state<D>(shared, warp, g);
    dst[D] = m_run, dst[D + 1] = l_run;
  }
  __syncthreads();
  write_partial_from_warp_states<D>(p, shared, work.partial_row, work.split);
}

// KVarN tiles for groups of at most 4 q heads (Llama's 32 / 8): the same reading of whole tiles per warp with the
// scores transposed too, tokens as the mma's 16 rows and the group's heads x (hi, lo) as its 8 columns, so that no
// mma row and no lane works for a head that does not exist (with the heads as rows, half of both would). Lane
// (g, m) = (lane / 4, lane % 4): B column g = head g / 2, part g % 2 (hi, lo); C columns 2m, 2m + 1 = head m, hi
// and lo, so a lane's results are head m's and a score is c0 + c1.
// Scores S^T = K q': k-slot i of k-block kb is channel 16 kb + i (as in attend_kvarn_tiles); m-tile (span pair sp,
// q): row r < 8 is token 64 sp + 4 r + q, row r + 8 is token 64 sp + 32 + 4 r + q; the A operand is the codes read
// with ldmatrix.trans. Values O^T = V^T P^T: k-step = score m-tile (its 16 tokens as k-slots), P^T moved from the
// scores' C layout into the B layout by movmatrix (an 8 x 8 transpose; p a_V in fp16, the lo columns zero); rows g
// and g + 8 of value m-tile (j, q') are channels g NV + (2j) kCPB + q' and g NV + (2j + 1) kCPB + q' (fragment
// column g of the value rows, bytes 2j and 2j + 1, code q' of each).
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
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);

  float o[NV] = {};  // head m, channels g NV + c
  float m_run = -FLT_MAX, l_run = 0;
  float s[kMTiles][2];  // the tile's weights of head m: [m-tile][row g, row g + 8]
  auto scores = [&](const uint8_t* tile, int it, const float* scales) {
    // ---- A = key codes (fp16 subnormals), B = q' a_K, this lane's column's part (hi or lo) ----
    float acc[kMTiles][4] = {};
    float z_sum = 0;  // sum_c q'_c z_K[c] of head g / 2 over this lane's channels
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      uint32_t hi[2], lo[2];
      fold_key_scales<F>(query_fragment<F>(shared, kb, g / 2), scales, kb, z_sum, hi, lo);
      const uint32_t b0 = (g & 1) ? lo[0] : hi[0], b1 = (g & 1) ? lo[1] : hi[1];
#pragma unroll
      for (int sp = 0; sp < kSpanPairs; ++sp) {
        uint32_t w[2][2];  // [channel half][token span of the pair]
        load_key_codes<F>(tile, key_base, kb, sp, w);
#pragma unroll
        for (int q2 = 0; q2 < 4; ++q2) {
          const int shift = q2 < 2 ? 0 : 8;
          const uint32_t mask = (q2 & 1) ? 0x00f000f0u : 0x000f000fu;
          const uint32_t a[4] = {(w[0][0] >> shift) & mask, (w[0][1] >> shift) & mask, (w[1][0] >> shift) & mask,
                                 (w[1][1] >> shift) & mask};
          mma_m16n8k16_rows16(acc[4 * sp + q2], a, b0, b1);
        }
      }
    }
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);
    z_sum = __shfl_sync(0xffffffffu, z_sum, 8 * m4);  // head m's: lane (2m, 0)

    // ---- scores of head m, tokens 32 s + 4 g + q, relative to the running maximum ----
    const float reference = it == 0 ? 0.0f : m_run;
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
    online_softmax_step(s, tile_max, it, reference, m_run, l_run, [&](float correction) {
#pragma unroll
      for (int c = 0; c < NV; ++c) o[c] *= correction;
    });
  };

  // ---- values: A = value codes (fp16 subnormals), B = (p a_V)^T in fp16 by movmatrix (lo columns zero) ----
  auto values = [&](const uint8_t* tile, const float* scales) {
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
          b[r] = movmatrix_trans(pack_half2(s[kk][r] * a_v[r][q2], 0.0f));
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
          o[ca] = fmaf(s_ch[ca], cc[0] + pz_k[q3], o[ca]);
          o[cb] = fmaf(s_ch[cb], cc[2] + pz_k[q3], o[cb]);
        }
    }
  };
  for_each_warp_tile<F>(p, work, shared, scores, values);
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

}  // namespace kvarn::cuda::decode
