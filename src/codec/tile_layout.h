#pragma once
// Byte layout of one tile (one kv-head, `tokens` tokens), defined once for the CPU and CUDA code alike.
// Header-only and constexpr so that device code can include it.
//
// Code tiles (kvarn, rot, rtn), per spec/kvarn-format.md, little-endian:
//   key_codes            D rows x (G*kb/8) bytes  row c: codes of tokens 0..G-1, code i at bit i*kb
//   key_scale      a_K   D   x fp16               per channel
//   key_zero       z_K   D   x fp16               per channel
//   key_token_scale      G   x fp16               s_tok_K, per token
//   value_codes          G rows x (D*vb/8) bytes  row t: codes of channels 0..D-1, code i at bit i*vb
//   value_channel_scale  D   x fp16               s_ch_V, per channel
//   value_scale    a_V   G   x fp16               per token
//   value_zero     z_V   G   x fp16               per token
//   K[c][t] ~= s_tok_K[t] * (a_K[c] * code + z_K[c]);  V[t][c] ~= s_ch_V[c] * (a_V[t] * code + z_V[t])
// fp16 tiles: keys [G][D] fp16, then values [G][D] fp16 (token-major, unrotated); fp32 tiles likewise in fp32.
// fp8_e4m3 tiles: keys [G][D] e4m3, then values [G][D] e4m3 (one per-tensor scale, held by the codec).
#include <cstddef>

namespace kvarn::codec {

struct TileLayout {
  int head_dim = 0;
  int tokens = 0;
  int key_bits = 0;
  int value_bits = 0;
  bool code_tile = false;

  size_t key_codes = 0;
  size_t key_scale = 0;
  size_t key_zero = 0;
  size_t key_token_scale = 0;
  size_t value_codes = 0;
  size_t value_channel_scale = 0;
  size_t value_scale = 0;
  size_t value_zero = 0;
  size_t bytes = 0;

  constexpr size_t key_row_bytes() const { return static_cast<size_t>(tokens) * key_bits / 8; }
  constexpr size_t value_row_bytes() const { return static_cast<size_t>(head_dim) * value_bits / 8; }
  constexpr bool operator==(const TileLayout&) const = default;
  // fp16 bytes of the same tile: what the compression ratios in the spec are measured against.
  constexpr size_t fp16_bytes() const { return static_cast<size_t>(4) * head_dim * tokens; }

  // Layout of an element-per-byte(s) tile (fp32: 32 bits, fp16: 16 bits, fp8: 8 bits).
  static constexpr TileLayout plain(int head_dim, int tokens, int bits) {
    TileLayout l;
    l.head_dim = head_dim;
    l.tokens = tokens;
    l.key_bits = l.value_bits = bits;
    const size_t half = static_cast<size_t>(head_dim) * tokens * bits / 8;
    l.key_codes = 0;
    l.value_codes = half;
    l.bytes = 2 * half;
    return l;
  }

  // Layout of a KVarN code tile.
  static constexpr TileLayout codes(int head_dim, int tokens, int key_bits, int value_bits) {
    TileLayout l;
    l.head_dim = head_dim;
    l.tokens = tokens;
    l.key_bits = key_bits;
    l.value_bits = value_bits;
    l.code_tile = true;
    const size_t d = static_cast<size_t>(head_dim), g = static_cast<size_t>(tokens);
    l.key_codes = 0;
    l.key_scale = l.key_codes + d * l.key_row_bytes();
    l.key_zero = l.key_scale + 2 * d;
    l.key_token_scale = l.key_zero + 2 * d;
    l.value_codes = l.key_token_scale + 2 * g;
    l.value_channel_scale = l.value_codes + g * l.value_row_bytes();
    l.value_scale = l.value_channel_scale + 2 * d;
    l.value_zero = l.value_scale + 2 * g;
    l.bytes = l.value_zero + 2 * g;
    return l;
  }
};

static_assert(TileLayout::codes(128, 128, 4, 2).bytes == 13824);
static_assert(TileLayout::codes(128, 128, 4, 4).bytes == 17920);
static_assert(TileLayout::codes(64, 128, 4, 2).bytes == 7296);
static_assert(TileLayout::codes(128, 64, 4, 2).bytes == 7296);

}  // namespace kvarn::codec
