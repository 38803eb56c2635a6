#include "codec/rtn.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kvarn::codec {

RowRange quantize_row(const float* row, int n, int bits, uint8_t* codes) {
  const auto [lo, hi] = std::minmax_element(row, row + n);
  const float max_code = static_cast<float>((1 << bits) - 1);
  const RowRange range{*lo, std::max((*hi - *lo) / max_code, 1e-10f)};
  const float inv_scale = 1.0f / range.scale;  // one division per row, as the CUDA flush computes it
  for (int i = 0; i < n; ++i) {
    const float q = std::nearbyint((row[i] - range.lo) * inv_scale);  // default rounding: half to even
    codes[i] = static_cast<uint8_t>(std::clamp(q, 0.0f, max_code));
  }
  return range;
}

void pack_codes(const uint8_t* codes, int n, int bits, uint8_t* packed) {
  const int per_byte = 8 / bits;
  std::memset(packed, 0, static_cast<size_t>(n) * bits / 8);
  for (int i = 0; i < n; ++i)
    packed[i / per_byte] |= static_cast<uint8_t>(codes[i] << ((i % per_byte) * bits));
}

void unpack_codes(const uint8_t* packed, int n, int bits, uint8_t* codes) {
  const int per_byte = 8 / bits;
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  for (int i = 0; i < n; ++i) codes[i] = (packed[i / per_byte] >> ((i % per_byte) * bits)) & mask;
}

}  // namespace kvarn::codec
