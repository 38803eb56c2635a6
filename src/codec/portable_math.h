#pragma once
// exp and log of float built from IEEE basic operations only (each product, sum and fma rounded once, in the
// order written), so that the CPU codec and the CUDA flush kernel compute the same bits: libm's and the
// device's expf / logf differ in the last ulp often enough to change which normalization iterate a tile keeps,
// and their double versions cost ~100 instructions per call on the GPU. Accuracy: a few float ulps (the tests
// bound the relative error by 2^-21 over the ranges the codec uses).
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define KVARN_HOST_DEVICE __host__ __device__
#else
#define KVARN_HOST_DEVICE
#endif

namespace kvarn::codec::portable {

// Rounded once each, never contracted (nvcc fuses a * b + c by default; the codec is built without contraction).
KVARN_HOST_DEVICE inline float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KVARN_HOST_DEVICE inline float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KVARN_HOST_DEVICE inline float fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
KVARN_HOST_DEVICE inline float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
KVARN_HOST_DEVICE inline float round_half_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return __builtin_nearbyintf(x);
#endif
}
KVARN_HOST_DEVICE inline uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
KVARN_HOST_DEVICE inline float float_of(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// log(x) for a positive normal x: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9 (truncation < 2^-30).
KVARN_HOST_DEVICE inline float log(float x) {
  const uint32_t u = bits_of(x);
  int e = static_cast<int>(u >> 23) - 127;
  float m = float_of((u & 0x007fffffu) | 0x3f800000u);
  if (m > 1.41421356f) m = mul(m, 0.5f), ++e;
  const float f = add(m, -1.0f);  // exact
  const float s = div(f, add(f, 2.0f));
  const float s2 = mul(s, s), two_s = mul(s, 2.0f);
  float p = fma(s2, 1.0f / 9, 1.0f / 7);
  p = fma(s2, p, 1.0f / 5);
  p = fma(s2, p, 1.0f / 3);
  const float log_m = fma(two_s, mul(p, s2), two_s);
  return fma(static_cast<float>(e), 0x1.62e430p-1f, log_m);
}

// exp(x) for |x| <= 80: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, n ln2_hi exact), e^r by Taylor to
// r^7 (truncation < 2^-27), times 2^n.
KVARN_HOST_DEVICE inline float exp(float x) {
  const float n = round_half_even(mul(x, 0x1.715476p+0f));
  float r = fma(-n, 0x1.62e400p-1f, x);
  r = fma(-n, 0x1.7f7d1cp-20f, r);
  float p = fma(r, 1.0f / 5040, 1.0f / 720);
  p = fma(r, p, 1.0f / 120);
  p = fma(r, p, 1.0f / 24);
  p = fma(r, p, 1.0f / 6);
  p = fma(r, p, 0.5f);
  p = fma(r, p, 1.0f);
  p = fma(r, p, 1.0f);
  return mul(p, float_of(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23));
}

}  // namespace kvarn::codec::portable
