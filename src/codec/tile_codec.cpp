#include "codec/tile_codec.h"

#include "codec/fp8.h"
#include "codec/hadamard.h"
#include "codec/rtn.h"
#include "codec/variance_normalize.h"
#include "util/error.h"
#include "util/half.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace kvarn::codec {

namespace {

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

void check_finite(const float* x, int tokens, int head_dim, const char* what) {
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < head_dim; ++c)
      if (!std::isfinite(x[t * head_dim + c]))
        throw Error("KV cache encode: {} of token {} channel {} is {}; refusing to store a non-finite value", what,
                    t, c, x[t * head_dim + c]);
}

void store_half(uint8_t* dst, const std::vector<float>& values) {
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = float_to_half(values[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

std::vector<float> load_half(const uint8_t* src, int n) {
  std::vector<float> out(n);
  for (int i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    out[i] = half_to_float(h);
  }
  return out;
}

// Folding leaves X[r][c] = outer[c] * (a[r] * code + z[r]). For inputs near fp16's limits a, z can leave fp16's
// normal range; moving a power of two from the row factors to the column factor changes no product, so do it
// before rounding to fp16.
void balance_for_fp16(std::vector<float>& a, std::vector<float>& z, std::vector<float>& outer) {
  float row_max = 0, outer_max = 0;
  for (size_t r = 0; r < a.size(); ++r) row_max = std::max({row_max, std::fabs(a[r]), std::fabs(z[r])});
  for (float s : outer) outer_max = std::max(outer_max, s);
  if (row_max == 0 || outer_max == 0) return;
  int shift = 0;  // multiply rows by 2^-shift, the outer factor by 2^shift
  if (row_max > 16384.0f) shift = static_cast<int>(std::ceil(std::log2(row_max / 16384.0f)));
  if (row_max < 0x1p-6f) shift = -static_cast<int>(std::ceil(std::log2(0x1p-6f / row_max)));
  while (shift < 0 && outer_max * std::ldexp(1.0f, shift) < 0x1p-6f) ++shift;  // keep the outer factor normal
  if (shift == 0) return;
  for (size_t r = 0; r < a.size(); ++r) {
    a[r] = std::ldexp(a[r], -shift);
    z[r] = std::ldexp(z[r], -shift);
  }
  for (float& s : outer) s = std::ldexp(s, shift);
}

// Quantizes X (rows x cols): optional variance normalization, RTN per row, folded scales (spec steps 3-5).
void encode_matrix(const float* x, int rows, int cols, int bits, bool normalize, uint8_t* codes_out,
                   uint8_t* row_scale_out, uint8_t* row_zero_out, uint8_t* col_scale_out) {
  Normalization norm = normalize ? variance_normalize(x, rows, cols)
                                 : Normalization{std::vector<float>(cols, 1.0f), std::vector<float>(rows, 1.0f)};
  std::vector<float> a(rows), z(rows), b(cols), inv_col(cols);
  std::vector<uint8_t> codes(cols);
  // B = X / s_col / s_row as the normalization formed it: times the reciprocals (the CUDA flush does the same).
  for (int c = 0; c < cols; ++c) inv_col[c] = 1.0f / norm.col_scale[c];
  const size_t row_bytes = static_cast<size_t>(cols) * bits / 8;
  for (int r = 0; r < rows; ++r) {
    const float inv_row = 1.0f / norm.row_scale[r];
    for (int c = 0; c < cols; ++c) b[c] = x[static_cast<long>(r) * cols + c] * inv_col[c] * inv_row;
    const RowRange range = quantize_row(b.data(), cols, bits, codes.data());
    pack_codes(codes.data(), cols, bits, codes_out + r * row_bytes);
    a[r] = norm.row_scale[r] * range.scale;
    z[r] = norm.row_scale[r] * range.lo;
  }
  balance_for_fp16(a, z, norm.col_scale);
  store_half(row_scale_out, a);
  store_half(row_zero_out, z);
  store_half(col_scale_out, norm.col_scale);
}

void decode_matrix(const uint8_t* codes_in, const uint8_t* row_scale_in, const uint8_t* row_zero_in,
                   const uint8_t* col_scale_in, int rows, int cols, int bits, float* x) {
  const auto a = load_half(row_scale_in, rows), z = load_half(row_zero_in, rows);
  const auto outer = load_half(col_scale_in, cols);
  std::vector<uint8_t> codes(cols);
  const size_t row_bytes = static_cast<size_t>(cols) * bits / 8;
  for (int r = 0; r < rows; ++r) {
    unpack_codes(codes_in + r * row_bytes, cols, bits, codes.data());
    for (int c = 0; c < cols; ++c)
      x[static_cast<long>(r) * cols + c] = outer[c] * std::fma(a[r], static_cast<float>(codes[c]), z[r]);
  }
}

std::vector<float> transpose(const float* x, int rows, int cols) {
  std::vector<float> out(static_cast<size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[static_cast<size_t>(c) * rows + r] = x[static_cast<size_t>(r) * cols + c];
  return out;
}

}  // namespace

void check_head_dim(int head_dim) {
  if (!is_power_of_two(head_dim) || head_dim < 8 || head_dim > 512)
    throw Error("head_dim {} is not supported by the KV cache; expected a power of two from 8 to 512", head_dim);
}

TileCodec::TileCodec(const CacheDtype& dtype, int head_dim, int tokens, float fp8_scale)
    : dtype_(dtype), fp8_scale_(fp8_scale) {
  check_head_dim(head_dim);
  if (dtype.code_tile()) {
    if (tokens != dtype.tile_tokens)
      throw Error("--block-size {} does not match --kv-cache-dtype {}, whose tiles hold {} tokens; use --block-size {}",
                  tokens, dtype.name, dtype.tile_tokens, dtype.tile_tokens);
    for (int bits : {dtype.key_bits, dtype.value_bits})
      if (bits != 2 && bits != 4 && bits != 8)
        throw Error("cache dtype {}: {} bits per code is not supported; expected 2, 4 or 8", dtype.name, bits);
    layout_ = TileLayout::codes(head_dim, tokens, dtype.key_bits, dtype.value_bits);
  } else {
    if (!is_power_of_two(tokens) || tokens < 8 || tokens > 256)
      throw Error("--block-size {} is not supported; expected a power of two from 8 to 256", tokens);
    layout_ = TileLayout::plain(head_dim, tokens, dtype.key_bits);
  }
  if (dtype.method == Method::fp8_e4m3 && !(std::isfinite(fp8_scale) && fp8_scale > 0))
    throw Error("fp8 KV cache scale {} is invalid; expected a positive finite number", fp8_scale);
}

void TileCodec::encode(const float* keys, const float* values, uint8_t* tile) const {
  if (!dtype_.rotated()) return encode_stored(keys, values, tile);
  const size_t n = static_cast<size_t>(layout_.tokens) * layout_.head_dim;
  check_finite(keys, layout_.tokens, layout_.head_dim, "key");
  check_finite(values, layout_.tokens, layout_.head_dim, "value");
  std::vector<float> k(keys, keys + n), v(values, values + n);
  hadamard_rotate_rows(k.data(), layout_.tokens, layout_.head_dim);
  hadamard_rotate_rows(v.data(), layout_.tokens, layout_.head_dim);
  encode_stored(k.data(), v.data(), tile);
}

void TileCodec::encode_stored(const float* keys, const float* values, uint8_t* tile) const {
  const int g = layout_.tokens, d = layout_.head_dim;
  const size_t n = static_cast<size_t>(g) * d;
  check_finite(keys, g, d, "key");
  check_finite(values, g, d, "value");
  switch (dtype_.method) {
    case Method::fp32:
      std::memcpy(tile + layout_.key_codes, keys, 4 * n);
      std::memcpy(tile + layout_.value_codes, values, 4 * n);
      return;
    case Method::fp16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t hk = float_to_half(keys[i]), hv = float_to_half(values[i]);
        std::memcpy(tile + layout_.key_codes + 2 * i, &hk, 2);
        std::memcpy(tile + layout_.value_codes + 2 * i, &hv, 2);
      }
      return;
    case Method::fp8_e4m3:
      for (size_t i = 0; i < n; ++i) {
        tile[layout_.key_codes + i] = float_to_e4m3(keys[i] / fp8_scale_);
        tile[layout_.value_codes + i] = float_to_e4m3(values[i] / fp8_scale_);
      }
      return;
    case Method::rtn:
    case Method::rot:
    case Method::kvarn: {
      // Keys are quantized per channel over the tile's tokens: lay them out channel-major (D x G).
      const auto key_tile = transpose(keys, g, d);
      encode_matrix(key_tile.data(), d, g, dtype_.key_bits, dtype_.normalized(), tile + layout_.key_codes,
                    tile + layout_.key_scale, tile + layout_.key_zero, tile + layout_.key_token_scale);
      encode_matrix(values, g, d, dtype_.value_bits, dtype_.normalized(), tile + layout_.value_codes,
                    tile + layout_.value_scale, tile + layout_.value_zero, tile + layout_.value_channel_scale);
      return;
    }
  }
}

void TileCodec::decode(const uint8_t* tile, float* keys, float* values) const {
  const int g = layout_.tokens, d = layout_.head_dim;
  const size_t n = static_cast<size_t>(g) * d;
  switch (dtype_.method) {
    case Method::fp32:
      std::memcpy(keys, tile + layout_.key_codes, 4 * n);
      std::memcpy(values, tile + layout_.value_codes, 4 * n);
      return;
    case Method::fp16: {
      const auto k = load_half(tile + layout_.key_codes, static_cast<int>(n));
      const auto v = load_half(tile + layout_.value_codes, static_cast<int>(n));
      std::copy(k.begin(), k.end(), keys);
      std::copy(v.begin(), v.end(), values);
      return;
    }
    case Method::fp8_e4m3:
      for (size_t i = 0; i < n; ++i) {
        keys[i] = e4m3_to_float(tile[layout_.key_codes + i]) * fp8_scale_;
        values[i] = e4m3_to_float(tile[layout_.value_codes + i]) * fp8_scale_;
      }
      return;
    case Method::rtn:
    case Method::rot:
    case Method::kvarn: {
      std::vector<float> key_tile(n);
      decode_matrix(tile + layout_.key_codes, tile + layout_.key_scale, tile + layout_.key_zero,
                    tile + layout_.key_token_scale, d, g, dtype_.key_bits, key_tile.data());
      const auto k = transpose(key_tile.data(), d, g);
      std::copy(k.begin(), k.end(), keys);
      decode_matrix(tile + layout_.value_codes, tile + layout_.value_scale, tile + layout_.value_zero,
                    tile + layout_.value_channel_scale, g, d, dtype_.value_bits, values);
      return;
    }
  }
}

}  // namespace kvarn::codec
