#pragma once
// H_D applied by one warp to one vector of D floats, lane l holding elements l*D/32 .. l*D/32 + D/32 - 1.
// The butterflies and the final 1/sqrt(D) scaling are the CPU codec's (codec/hadamard.cpp), in the same order
// and with the same roundings (a + b == b + a exactly), so the result is bit-identical to the CPU's.
#include <cuda_runtime.h>

namespace kvarn::cuda {

template <int D>
__device__ __forceinline__ void hadamard_warp(float (&x)[D / 32]) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int step = 1; step < E; step *= 2)
#pragma unroll
    for (int i = 0; i < E; ++i)
      if (!(i & step)) {
        const float a = x[i], b = x[i + step];
        x[i] = __fadd_rn(a, b);
        x[i + step] = __fsub_rn(a, b);
      }
#pragma unroll
  for (int s = 1; s < 32; s *= 2)
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float partner = __shfl_xor_sync(0xffffffffu, x[i], s);
      x[i] = (lane & s) ? __fsub_rn(partner, x[i]) : __fadd_rn(x[i], partner);
    }
  const float norm = 1.0f / sqrtf(static_cast<float>(D));
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = __fmul_rn(x[i], norm);
}

}  // namespace kvarn::cuda
