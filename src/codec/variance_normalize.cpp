#include "codec/variance_normalize.h"

#include <algorithm>
#include <cmath>

namespace kvarn::codec {

namespace {

constexpr float kStdFloor = 1e-3f, kStdCeil = 1e3f;
constexpr float kLogScaleMin = -0.3f, kLogScaleMax = 10.0f;

// cur = x / exp(log_col)[col] / exp(log_row)[row], then unbiased standard deviations of its rows and (when asked)
// its columns, each by two passes (mean, then squared deviations): one-pass sum-of-squares cancels badly on
// tiles with a 100x attention-sink token.
struct Tile {
  int rows, cols;
  std::vector<float> cur, row_std, col_std, col_mean;

  void refresh(const float* x, const std::vector<float>& log_row, const std::vector<float>& log_col, bool columns) {
    std::vector<float> inv_col(cols);
    for (int j = 0; j < cols; ++j) inv_col[j] = 1.0f / std::exp(log_col[j]);
    std::fill(col_mean.begin(), col_mean.end(), 0.0f);
    for (int i = 0; i < rows; ++i) {
      const float inv_row = 1.0f / std::exp(log_row[i]);
      const float* in = x + static_cast<long>(i) * cols;
      float* out = cur.data() + static_cast<long>(i) * cols;
      float sum = 0;
      for (int j = 0; j < cols; ++j) {
        out[j] = in[j] * inv_col[j] * inv_row;
        sum += out[j];
        col_mean[j] += out[j];
      }
      const float mean = sum / cols;
      float dev = 0;
      for (int j = 0; j < cols; ++j) dev += (out[j] - mean) * (out[j] - mean);
      row_std[i] = std::sqrt(dev / (cols - 1));
    }
    if (!columns) return;
    for (int j = 0; j < cols; ++j) col_mean[j] /= rows;
    std::vector<float> col_dev(cols, 0.0f);
    for (int i = 0; i < rows; ++i) {
      const float* row = cur.data() + static_cast<long>(i) * cols;
      for (int j = 0; j < cols; ++j) col_dev[j] += (row[j] - col_mean[j]) * (row[j] - col_mean[j]);
    }
    for (int j = 0; j < cols; ++j) col_std[j] = std::sqrt(col_dev[j] / (rows - 1));
  }

  float imbalance() const {
    const auto [col_min, col_max] = std::minmax_element(col_std.begin(), col_std.end());
    const auto [row_min, row_max] = std::minmax_element(row_std.begin(), row_std.end());
    return *col_max / std::max(*col_min, 1e-8f) + *row_max / std::max(*row_min, 1e-8f);
  }
};

void step_log_scales(std::vector<float>& log_scale, const std::vector<float>& std_dev) {
  for (size_t k = 0; k < log_scale.size(); ++k) {
    log_scale[k] += std::log(std::clamp(std_dev[k], kStdFloor, kStdCeil));
    log_scale[k] = std::clamp(log_scale[k], kLogScaleMin, kLogScaleMax);
  }
}

std::vector<float> exp_of(const std::vector<float>& log_scale) {
  std::vector<float> out(log_scale.size());
  for (size_t k = 0; k < out.size(); ++k) out[k] = std::exp(log_scale[k]);
  return out;
}

}  // namespace

Normalization variance_normalize(const float* x, int rows, int cols, int iterations) {
  Tile tile{rows, cols, std::vector<float>(static_cast<size_t>(rows) * cols), std::vector<float>(rows),
            std::vector<float>(cols), std::vector<float>(cols)};
  std::vector<float> log_row(rows, 0.0f), log_col(cols, 0.0f);
  tile.refresh(x, log_row, log_col, true);

  Normalization best{std::vector<float>(cols, 1.0f), std::vector<float>(rows, 1.0f), tile.imbalance(), 0};
  for (int it = 1; it <= iterations; ++it) {
    step_log_scales(log_col, tile.col_std);
    tile.refresh(x, log_row, log_col, false);
    step_log_scales(log_row, tile.row_std);
    tile.refresh(x, log_row, log_col, true);
    const float imbalance = tile.imbalance();
    if (imbalance <= best.imbalance) best = {exp_of(log_col), exp_of(log_row), imbalance, it};
  }
  return best;
}

}  // namespace kvarn::codec
