#pragma once
// Tensor-core helpers for the attention kernels: mma.sync m16n8k16 (fp16 in, fp32 accumulate), ldmatrix,
// cp.async, and the byte permute that pairs packed codes of two rows in the two halves of an operand register.
//
// Fragment layout (PTX ISA, m16n8k16 .f16): g = lane / 4, m = lane % 4
//   A (16 x 16, row):  a[0] = (row g,   k 2m, 2m+1)  a[1] = (row g+8, k 2m, 2m+1)
//                      a[2] = (row g,   k 2m+8, 2m+9) a[3] = (row g+8, k 2m+8, 2m+9)
//   B (16 x 8, col):   b[0] = (k 2m, 2m+1; col g)     b[1] = (k 2m+8, 2m+9; col g)
//   C (16 x 8):        c[0], c[1] = (row g, col 2m, 2m+1)   c[2], c[3] = row g+8
#include <cuda_fp16.h>

#include <cstdint>

namespace kvarn::cuda {

__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  // Rows 8-15 of A are zero here (at most 8 query heads in a block: head_blocks), so a[1] = a[3] = 0.
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// The full m16n8k16 (16 rows of A), for prefill, where the rows are query tokens.
__device__ __forceinline__ void mma_m16n8k16_rows16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 fp16 matrix i; r[i] receives, per lane, row lane/4,
// columns 2(lane%4), +1 of matrix i (with .trans: rows 2(lane%4), +1 of column lane/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* shared) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The transpose of an 8x8 b16 matrix held as a fragment (lane: row lane/4, columns 2(lane%4), +1, low half first).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// __byte_perm selector putting byte b of x in byte 0 and byte b of y in byte 2 (bytes 1, 3: don't care).
__host__ __device__ constexpr uint32_t pair_selector(int b) {
  return static_cast<uint32_t>(b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12));
}

__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(global));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace kvarn::cuda
