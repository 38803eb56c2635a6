#pragma once
// A kernel that writes late, for testing what a programmatic dependent launch reads before it waits: it lets
// the kernel after it launch at once (griddepcontrol.launch_dependents), spins, and only then copies.
#include <cuda_runtime.h>

#include <cstddef>
#include <initializer_list>

namespace kvarn::cuda::test {

struct DelayedCopy {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;  // a multiple of 2
};

// Up to 4 device-to-device copies, made by one kernel on `stream` after it has spun for delay_ns.
void copy_after_delay(std::initializer_list<DelayedCopy> copies, long delay_ns, cudaStream_t stream);

}  // namespace kvarn::cuda::test
