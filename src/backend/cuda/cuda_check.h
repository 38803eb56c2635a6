#pragma once
// KVARN_CUDA_CHECK(call): turns a failed CUDA runtime call (or a failed launch, via cudaGetLastError) into a
// kvarn::Error naming the call, the file and the line. The throwing lives in cuda_check.cpp because nvcc's
// front end cannot compile fmt's compile-time format strings, so .cu files never include util/error.h.
#include <cuda_runtime.h>

#include <string>

namespace kvarn::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line);
[[noreturn]] void throw_error(const std::string& message);  // a kvarn::Error with this message

}  // namespace kvarn::cuda

#define KVARN_CUDA_CHECK(call)                                                                 \
  do {                                                                                         \
    const cudaError_t kvarn_cuda_status = (call);                                              \
    if (kvarn_cuda_status != cudaSuccess)                                                      \
      ::kvarn::cuda::throw_cuda_error(kvarn_cuda_status, #call, __FILE__, __LINE__);           \
  } while (0)
