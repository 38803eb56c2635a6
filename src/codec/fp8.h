#pragma once
// OCP FP8 E4M3 (bias 7, no infinities, max 448, NaN = 0x7f): round-to-nearest-even with saturation to +-448,
// as vLLM's fp8 KV cache stores it (value / scale).
#include <cmath>
#include <cstdint>

namespace kvarn::codec {

inline uint8_t float_to_e4m3(float value) {
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float a = std::fabs(value);
  if (std::isnan(a)) return 0x7f;
  int code;
  if (a < 0.015625f) {  // below the smallest normal 2^-6: subnormals are multiples of 2^-9
    code = static_cast<int>(std::nearbyint(a * 512.0f));
  } else {
    const int e = std::ilogb(a);  // a = m * 2^e, m in [1, 2)
    const int q = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - e)));  // in [8, 16]; 16 carries into e+1
    code = e >= 9 ? 0x7e : ((e + 7) << 3) + (q - 8);
  }
  return static_cast<uint8_t>(sign | (code > 0x7e ? 0x7e : code));
}

inline float e4m3_to_float(uint8_t code) {
  const int e = (code >> 3) & 0xf, m = code & 0x7;
  if (e == 0xf && m == 0x7) return NAN;
  const float magnitude = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (code & 0x80) ? -magnitude : magnitude;
}

}  // namespace kvarn::codec
