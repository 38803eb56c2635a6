#pragma once
// A value computed once per CUDA device, for the device current at the call. A kernel's opt-in shared memory is set
// per device (cudaFuncSetAttribute), and occupancy and device properties may differ between the GPUs one process
// drives (tensor parallelism), so a launch reads the values of the device it launches on.
#include "backend/cuda/cuda_check.h"

#include <array>
#include <mutex>
#include <string>

namespace kvarn::cuda {

constexpr int kMaxDevices = 64;

// make(): the value for the current device; called once per device (again after it throws). Each call site's
// lambda is a type of its own, and so are its values.
template <class T, class Make>
const T& once_per_device(Make make) {
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<T, kMaxDevices> values;
  int device = 0;
  KVARN_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices)
    throw_error("CUDA device " + std::to_string(device) + ": expected at most " + std::to_string(kMaxDevices) +
                " devices per process");
  std::call_once(once[device], [&] { values[device] = make(); });
  return values[device];
}

}  // namespace kvarn::cuda
