#include "backend/cpu/cpu_backend.h"

#include "util/error.h"

#include <cblas.h>

#include <cmath>
#include <cstring>

namespace kvarn::backend {

CpuBackend::CpuBackend(int threads) : pool_(threads) { openblas_set_num_threads(pool_.size()); }

Weight CpuBackend::upload_weight(std::vector<float> host, int rows, int cols) {
  if (host.size() != static_cast<size_t>(rows) * cols)
    throw Error("upload_weight: {} values for a {}x{} matrix", host.size(), rows, cols);
  auto owned = std::make_shared<std::vector<float>>(std::move(host));
  return {std::shared_ptr<const float>(owned, owned->data()), rows, cols};
}

std::shared_ptr<float> CpuBackend::allocate(size_t floats) {
  return std::shared_ptr<float>(new float[floats](), std::default_delete<float[]>());
}

void CpuBackend::upload(const float* host, Tensor dst) {
  std::memcpy(dst.data, host, sizeof(float) * dst.rows * dst.cols);
}

void CpuBackend::download(Tensor src, float* host) {
  std::memcpy(host, src.data, sizeof(float) * src.rows * src.cols);
}

void CpuBackend::embed(const Weight& table, std::span<const int32_t> ids, Tensor out) {
  for (size_t r = 0; r < ids.size(); ++r) {
    if (ids[r] < 0 || ids[r] >= table.rows)
      throw Error("token id {} is outside the vocabulary (size {})", ids[r], table.rows);
    std::memcpy(out.row(static_cast<int>(r)), table.data.get() + static_cast<size_t>(ids[r]) * table.cols,
                sizeof(float) * table.cols);
  }
}

void CpuBackend::rmsnorm(Tensor x, const Weight& gain, float eps, Tensor out) {
  for (int r = 0; r < x.rows; ++r) {
    const float* in = x.row(r);
    float sum = 0;
    for (int c = 0; c < x.cols; ++c) sum += in[c] * in[c];
    const float inv = 1.0f / std::sqrt(sum / x.cols + eps);
    float* o = out.row(r);
    for (int c = 0; c < x.cols; ++c) o[c] = in[c] * inv * gain.data.get()[c];
  }
}

void CpuBackend::matmul(Tensor x, const Weight& w, const Weight& bias, Tensor out) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, x.rows, w.rows, w.cols, 1.0f, x.data, x.cols, w.data.get(),
              w.cols, 0.0f, out.data, out.cols);
  if (!bias.data) return;
  for (int r = 0; r < out.rows; ++r)
    for (int c = 0; c < out.cols; ++c) out.row(r)[c] += bias.data.get()[c];
}

void CpuBackend::rope(Tensor x, int heads, Tensor cos_sin) {
  const int d = x.cols / heads, half = d / 2;
  for (int r = 0; r < x.rows; ++r) {
    const float* cos = cos_sin.row(r);
    const float* sin = cos + half;
    for (int h = 0; h < heads; ++h) {
      float* v = x.row(r) + h * d;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
      }
    }
  }
}

void CpuBackend::swiglu(Tensor gate, Tensor up, Tensor out) {
  for (int r = 0; r < gate.rows; ++r)
    for (int c = 0; c < gate.cols; ++c) {
      const float g = gate.row(r)[c];
      out.row(r)[c] = g / (1.0f + std::exp(-g)) * up.row(r)[c];
    }
}

void CpuBackend::add(Tensor x, Tensor y) {
  const size_t n = static_cast<size_t>(x.rows) * x.cols;
  for (size_t i = 0; i < n; ++i) x.data[i] += y.data[i];
}

}  // namespace kvarn::backend
