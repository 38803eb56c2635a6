// Decode attention over KVarN tiles for groups of 9-16 q heads per kv head (Llama-3.1-405B's and Qwen3-235B's 16,
// Qwen3-Coder-480B's 12), one warp per tile: the heads are the mma's 16 rows, so that every code unpacked from a tile
// serves the whole group. Served in two blocks of up to 8 by the kernels of decode_kvarn_tiles.cuh, a group of 16
// had each block's CTAs read and unpack every tile again.
#pragma once
#include "backend/cuda/decode_kvarn_tiles.cuh"

namespace kvarn::cuda::decode {

// Lane (g, m) = (lane / 4, lane % 4) holds heads g and g + 8 (the rows of every C fragment; hh = 0, 1 below).
// Scores S = (q' a_K) K: A = the folded query as one fp16 operand per head, rounded with the rounding centred on the
// tile's largest-scale token as fold_key_scales_rounded does (that token's codes in every column of one more mma
// per k-block); B = the key codes as load_key_codes reads them for the kernels of up to 8 heads (key_code_operand),
// so that score n-tile (pass, s, q2) = 8 pass + 4 s + q2 has in column n token 64 pass + 32 s + 4n + q2, and a
// lane's columns 2m + e are tokens 64 pass + 32 s + 8m + 4e + q2.
// Values O = (p a_V) V: A = the weights as fp16 straight from the scores' C fragments (k-slots 0-7: n-tile (pass, 0,
// q2), 8-15: (pass, 1, q2), no transpose), B = the value codes as the kernels of up to 8 heads pair them
// (pair_column_byte: the two tokens 4 apart of a lane's k-slots); value n-tile v = (byte of the column pair)
// * codes per byte + code has in column n channel n NV + v. Per tile and warp 2 x 8 x G / 8 mma, as many as two
// blocks of 8 heads take, and half their unpacking, scales and copies. The warps' states are left in the merge
// buffer.
template <class F>
__device__ __forceinline__ void attend_kvarn_tiles_wide(const DecodeParams& p, const CtaWork& work, uint8_t* shared) {
  constexpr int D = F::D, G = F::G, VB = F::VB, KBLK = D / 16, NV = D / 8;
  constexpr int kPasses = G / 64, kScoreTiles = G / 8, kSteps = G / 16;  // value k-steps: (pass, q2)
  constexpr int kCodesPerByte = 8 / VB, kColBytes = ValueRows<F>::kColBytes;
  using Rows = ValueRows<F>;
  using Scales = TileScales<F>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, m4 = lane % 4;
  const int key_base = key_row_offset<F>(lane);
  int value_base[2][4];
  value_code_offsets<F>(lane, value_base);

  float o[NV][4] = {};  // value n-tile v: heads g (0, 1) and g + 8 (2, 3), channels (2m + e) NV + v
  float m_run[2] = {-FLT_MAX, -FLT_MAX}, l_run[2] = {0, 0};
  float s[2][kScoreTiles][2];  // the tile's weights of head g + 8 hh: [score n-tile][column 2m + e]
  auto scores = [&](const uint8_t* tile, int it, const float* scales) {
    float acc[kScoreTiles][4] = {};
    float z_sum[2] = {0, 0};  // q' (z_K + a_K x) of heads g, g + 8 over this lane's channels
    float centre[4] = {};     // sum_c b_c x_c: columns alike, rows the heads
#pragma unroll
    for (int kb = 0; kb < KBLK; ++kb) {
      const float4 av = reinterpret_cast<const float4*>(scales + Scales::a_k)[4 * kb + m4];
      const float4 zv = reinterpret_cast<const float4*>(scales + Scales::z_k)[4 * kb + m4];
      const uint4 x = reinterpret_cast<const uint4*>(scales + Scales::centre_k)[4 * kb + m4];
      uint32_t a[4];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float4 q = query_fragment<F, kMaxTileGroup>(shared, kb, g + 8 * hh);
        a[hh] = pack_half2(q.x * av.x, q.y * av.y);
        a[2 + hh] = pack_half2(q.z * av.z, q.w * av.w);
        z_sum[hh] = fmaf(q.w, zv.w, fmaf(q.z, zv.z, fmaf(q.y, zv.y, fmaf(q.x, zv.x, z_sum[hh]))));
      }
      mma_m16n8k16_rows16(centre, a, x.x, x.z);
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        uint32_t w[2][2];  // [channel half][token span of the pass]
        load_key_codes<F>(tile, key_base, kb, pass, w);
#pragma unroll
        for (int sp = 0; sp < 2; ++sp)
#pragma unroll
          for (int q2 = 0; q2 < 4; ++q2)
            mma_m16n8k16_rows16(acc[8 * pass + 4 * sp + q2], a, key_code_operand(w[0][sp], q2),
                                key_code_operand(w[1][sp], q2));
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float z = z_sum[hh];
      z += __shfl_xor_sync(0xffffffffu, z, 1);
      z += __shfl_xor_sync(0xffffffffu, z, 2);
      const float z_even = z / kSubnormalScale - centre[2 * hh], z_odd = 16.0f * z_even;
      const float reference = it == 0 ? 0.0f : m_run[hh];
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass)
#pragma unroll
        for (int sp = 0; sp < 2; ++sp) {
          float s_tok[8];  // tokens 32 (2 pass + sp) + 8m + 4e + q2 at 4e + q2
          load_floats(scales + Scales::s_tok + padded(32 * (2 * pass + sp) + 8 * m4), s_tok);
#pragma unroll
          for (int q2 = 0; q2 < 4; ++q2) {
            const int n = 8 * pass + 4 * sp + q2;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float c = acc[n][2 * hh + e];
              const float dot = (q2 & 1) ? c - acc[n - 1][2 * hh + e] : c;
              s[hh][n][e] = fmaf(s_tok[4 * e + q2], dot + ((q2 & 1) ? z_odd : z_even), -reference);
            }
          }
        }
      // ---- online softmax of head g + 8 hh over the tile (the 4 lanes of row g) ----
      float tile_max = -FLT_MAX;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(s[hh][n][0], s[hh][n][1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      online_softmax_step(s[hh], tile_max, it, reference, m_run[hh], l_run[hh], [&](float correction) {
#pragma unroll
        for (int v = 0; v < NV; ++v) o[v][2 * hh] *= correction, o[v][2 * hh + 1] *= correction;
      });
    }
  };

  // ---- values: A = p a_V in fp16 (the scores' C layout is the A layout), B = value codes (fp16 subnormals) ----
  auto values = [&](const uint8_t* tile, const float* scales) {
    uint32_t a[kSteps][4];  // k-step (pass, q2): rows g, g + 8; k-slots of spans 2 pass and 2 pass + 1
    float pz[2] = {0, 0};   // sum_t p_t z_V[t] of heads g, g + 8 over this lane's tokens
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass)
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        float a_v[8], z_v[8];  // tokens 32 (2 pass + sp) + 8m + 4e + q2 at 4e + q2
        load_floats(scales + Scales::a_v + padded(32 * (2 * pass + sp) + 8 * m4), a_v);
        load_floats(scales + Scales::z_v + padded(32 * (2 * pass + sp) + 8 * m4), z_v);
#pragma unroll
        for (int q2 = 0; q2 < 4; ++q2) {
          const int n = 8 * pass + 4 * sp + q2;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            pz[hh] = fmaf(s[hh][n][1], z_v[4 + q2], fmaf(s[hh][n][0], z_v[q2], pz[hh]));
            a[4 * pass + q2][2 * sp + hh] = pack_half2(s[hh][n][0] * a_v[q2], s[hh][n][1] * a_v[4 + q2]);
          }
        }
      }
    float c[NV][4] = {};
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass)
#pragma unroll
      for (int q2 = 0; q2 < 4; ++q2) {
        // Column g of tokens 32 (2 pass + r) + 8m + 4e + q2 (k-slots 2m + e of span r): v[r][e].
        auto column = [&](int r, int e) {
          return ValueColumn<F>(tile + value_base[e][q2] + 32 * (2 * pass + r) * Rows::kRowBytes);
        };
        const ValueColumn<F> v[2][2] = {{column(0, 0), column(0, 1)}, {column(1, 0), column(1, 1)}};
#pragma unroll
        for (int byte = 0; byte < kColBytes; ++byte) {
          const uint32_t x0 = pair_column_byte(v[0][0], v[0][1], byte);
          const uint32_t x1 = pair_column_byte(v[1][0], v[1][1], byte);
#pragma unroll
          for (int q3 = 0; q3 < kCodesPerByte; ++q3) {
            const uint32_t mask = ((1u << VB) - 1) * 0x00010001u << (q3 * VB);
            mma_m16n8k16_rows16(c[byte * kCodesPerByte + q3], a[4 * pass + q2], x0 & mask, x1 & mask);
          }
        }
      }
    float s_ch[2][NV];  // channels (2m + e) NV + v
#pragma unroll
    for (int e = 0; e < 2; ++e) load_floats(scales + Scales::s_ch + padded((2 * m4 + e) * NV), s_ch[e]);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      pz[hh] += __shfl_xor_sync(0xffffffffu, pz[hh], 1);
      pz[hh] += __shfl_xor_sync(0xffffffffu, pz[hh], 2);
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        // pz in the units of a code at bit k of its byte: 2^(k - 24)
        const float pz_k = pz[hh] * (static_cast<float>(1 << ((v % kCodesPerByte) * VB)) / kSubnormalScale);
#pragma unroll
        for (int e = 0; e < 2; ++e)
          o[v][2 * hh + e] = fmaf(s_ch[e][v], c[v][2 * hh + e] + pz_k, o[v][2 * hh + e]);
      }
    }
  };
  for_each_warp_tile<F, true, kMaxTileGroup>(p, work, shared, scores, values);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 1);
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 2);
    const int head = g + 8 * hh;
    if (head < work.heads) {
      float* dst = warp_state<D>(shared, warp, head);
#pragma unroll
      for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < 2; ++e) dst[(2 * m4 + e) * NV + v] = o[v][2 * hh + e];
      if (m4 == 0) dst[D] = m_run[hh], dst[D + 1] = l_run[hh];
    }
  }
  __syncthreads();
}

}  // namespace kvarn::cuda::decode
