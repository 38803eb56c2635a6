// 2^x for the softmax weights of the attention kernels.
#pragma once

namespace kvarn::cuda {

// 2^x in one MUFU op; exp2f adds a fix-up for results below 2^-126, weights too small to matter here.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace kvarn::cuda
