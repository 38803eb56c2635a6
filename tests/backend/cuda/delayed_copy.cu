#include "delayed_copy.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/programmatic_launch.cuh"

#include <cstdint>
#include <stdexcept>

namespace kvarn::cuda::test {
namespace {

constexpr int kMaxCopies = 4;

struct Copies {
  DelayedCopy part[kMaxCopies];
  int count;
};

__device__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void copy_after_delay_kernel(const Copies copies, long delay_ns) {
  release_next_kernel();
  const uint64_t start = global_ns();
  while (global_ns() - start < static_cast<uint64_t>(delay_ns)) {
  }
  for (int i = 0; i < copies.count; ++i) {
    const DelayedCopy& c = copies.part[i];
    for (size_t k = blockIdx.x * blockDim.x + threadIdx.x; k < c.bytes / 2; k += size_t{gridDim.x} * blockDim.x)
      static_cast<uint16_t*>(c.dst)[k] = static_cast<const uint16_t*>(c.src)[k];
  }
}

}  // namespace

void copy_after_delay(std::initializer_list<DelayedCopy> copies, long delay_ns, cudaStream_t stream) {
  if (copies.size() > kMaxCopies) throw std::invalid_argument("copy_after_delay: at most 4 copies");
  Copies all{};
  for (const DelayedCopy& c : copies) all.part[all.count++] = c;
  copy_after_delay_kernel<<<8, 256, 0, stream>>>(all, delay_ns);
  KVARN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvarn::cuda::test
