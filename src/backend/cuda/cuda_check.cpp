#include "backend/cuda/cuda_check.h"

#include "util/error.h"

namespace kvarn::cuda {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  throw Error("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(status), cudaGetErrorString(status), call, file,
              line);
}

void throw_error(const std::string& message) { throw Error(message); }

}  // namespace kvarn::cuda
