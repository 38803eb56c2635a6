#pragma once
// Helpers of the CUDA kernel tests: skip without a GPU, argument checks, device buffers, fp16 vectors, captured K/V.
#include "backend/cuda/cuda_check.h"
#include "util/error.h"
#include "util/half.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvarn::cuda::test {

// Whether a CUDA device can be used. Where KVARN_REQUIRE_GPU is set (scripts/gpu-check.sh sets it), a GPU test
// without one fails with the reason instead of being skipped, so that a broken driver cannot pass a GPU run.
inline bool have_gpu() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (std::getenv("KVARN_REQUIRE_GPU") && (status != cudaSuccess || count == 0))
    ADD_FAILURE() << "KVARN_REQUIRE_GPU is set, but no CUDA device can be used: "
                  << (status != cudaSuccess ? cudaGetErrorString(status) : "none found");
  return status == cudaSuccess && count > 0;
}

#define KVARN_SKIP_WITHOUT_GPU() \
  if (!::kvarn::cuda::test::have_gpu()) GTEST_SKIP() << "no CUDA device"

// Runs fn() with each CUDA device current in turn, the last first (the suite's earlier tests ran on device 0), and
// leaves device 0 current, also where fn fails half-way. Skips the test with fewer than 2 devices.
template <class Fn>
void on_every_device(Fn&& fn) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2)
    GTEST_SKIP() << devices << " CUDA device; the test needs 2";
  struct BackOnDeviceZero {
    ~BackOnDeviceZero() { cudaSetDevice(0); }
  } back;
  for (int device = devices - 1; device >= 0; --device) {
    SCOPED_TRACE("device " + std::to_string(device));
    KVARN_CUDA_CHECK(cudaSetDevice(device));
    fn();
  }
}

// Matches a call that throws kvarn::Error with `text` in its message: a kernel's argument checks, which refuse bad
// arguments before anything is launched. EXPECT_THAT([&] { call(); }, refused_with("expected ..."));
inline auto refused_with(const std::string& text) {
  return ::testing::ThrowsMessage<kvarn::Error>(::testing::HasSubstr(text));
}

// A 16-byte aligned address (or `offset` bytes past one) that is never dereferenced: the argument checks, which
// refuse before anything is launched, take it for device memory, so that their tests need no GPU.
template <class T>
T* fake_device_address(uintptr_t offset = 0) {
  return reinterpret_cast<T*>(uintptr_t{0x10000} + offset);
}

// Fresh random inputs on every run; KVARN_TEST_SEED=N replays the run whose failure message printed seed N.
inline uint32_t test_seed() {
  const char* text = std::getenv("KVARN_TEST_SEED");
  if (!text) return std::random_device{}();
  char* end = nullptr;
  const unsigned long long seed = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || text[0] == '-' || seed > UINT32_MAX)
    throw std::invalid_argument(std::string("KVARN_TEST_SEED: expected an unsigned 32-bit integer, got '") + text +
                                "'");
  return static_cast<uint32_t>(seed);
}

template <typename T>
class DeviceBuffer {
public:
  explicit DeviceBuffer(size_t count = 0) : count_(count) {
    if (count) KVARN_CUDA_CHECK(cudaMalloc(&data_, count * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(data_); }
  T* get() const { return data_; }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    KVARN_CUDA_CHECK(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    KVARN_CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison() { KVARN_CUDA_CHECK(cudaMemset(data_, 0xff, count_ * sizeof(T))); }  // fp16 0xffff is a NaN

private:
  T* data_ = nullptr;
  size_t count_ = 0;
};

inline std::vector<uint16_t> to_half(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = float_to_half(x[i]);
  return out;
}

inline std::vector<float> to_float(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = half_to_float(x[i]);
  return out;
}

// Post-RoPE K/V captured from kvarn-test-lm (shared/golden/kvarn-test-lm/kv_capture.safetensors): per tensor
// "layer{0,4,7}.{k,v}", [kv_heads][tokens][head_dim] fp16. Empty when the file is absent.
struct CapturedTensor {
  std::vector<int> shape;
  std::vector<uint16_t> data;
};

inline std::map<std::string, CapturedTensor> load_captured_kv(const std::string& path) {
  std::map<std::string, CapturedTensor> out;
  std::ifstream file(path, std::ios::binary);
  if (!file) return out;
  uint64_t header_len = 0;
  file.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  file.read(header.data(), static_cast<std::streamsize>(header_len));
  const auto meta = nlohmann::json::parse(header);
  std::vector<char> body((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  for (const auto& [name, info] : meta.items()) {
    if (name == "__metadata__" || info.at("dtype") != "F16") continue;
    CapturedTensor t;
    t.shape = info.at("shape").get<std::vector<int>>();
    const auto begin = info.at("data_offsets")[0].get<size_t>(), end = info.at("data_offsets")[1].get<size_t>();
    t.data.resize((end - begin) / 2);
    std::memcpy(t.data.data(), body.data() + begin, end - begin);
    out[name] = std::move(t);
  }
  return out;
}

}  // namespace kvarn::cuda::test
