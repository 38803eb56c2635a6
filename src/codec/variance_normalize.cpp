#include "codec/variance_normalize.h"

#include "codec/portable_math.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace kvarn::codec {

namespace {

constexpr float kStdFloor = 1e-3f, kStdCeil = 1e3f;
constexpr float kLogScaleMin = -0.3f, kLogScaleMax = 10.0f;

// The order of every sum below is part of the codec: the CUDA flush kernel reproduces it bit for bit with one
// warp lane per partial. A row's terms go to 8 partials in chunks of consecutive terms, a column's terms to 8
// strided partials (row i to partial i mod 8); each partial adds its terms in order, squared deviations by fma,
// and the 8 partials meet in a halving tree. Standard deviations are two-pass (mean, then squared deviations):
// one-pass sums of squares cancel badly on tiles with a 100x attention-sink token.
constexpr int kPartials = kSumPartials;
using Partials = std::array<float, kPartials>;

float tree_sum(Partials p) {
  for (int half = kPartials / 2; half > 0; half /= 2)
    for (int k = 0; k < half; ++k) p[k] += p[k + half];
  return p[0];
}

// Unbiased standard deviation of the n terms term(i), term i summed into partial part(i).
template <class Term, class Part>
float ordered_std(int n, Term term, Part part) {
  Partials sum{};
  for (int i = 0; i < n; ++i) sum[part(i)] += term(i);
  const float mean = tree_sum(sum) / static_cast<float>(n);
  Partials dev{};
  for (int i = 0; i < n; ++i) {
    const float d = term(i) - mean;
    dev[part(i)] = std::fma(d, d, dev[part(i)]);
  }
  return std::sqrt(tree_sum(dev) / static_cast<float>(n - 1));
}

// cur = x * inv_col[col] * inv_row[row] has row i's standard deviation inv_row[i] * row_spread[i] and column j's
// inv_col[j] * col_spread[j], where the spreads are those of x * inv_col (rows) and of x * inv_row (columns).
// So a column step needs one pass over the rows and a row step one pass over the columns, each multiplying by a
// single factor; the spec's cur is never formed.
struct Spreads {
  const float* x;
  int rows, cols;

  void of_rows(const std::vector<float>& inv_col, std::vector<float>& out) const {
    const int chunk = (cols + kPartials - 1) / kPartials;
    for (int i = 0; i < rows; ++i) {
      const float* row = x + static_cast<long>(i) * cols;
      out[i] = ordered_std(cols, [&](int j) { return row[j] * inv_col[j]; }, [&](int j) { return j / chunk; });
    }
  }

  void of_columns(const std::vector<float>& inv_row, std::vector<float>& out) const {
    for (int j = 0; j < cols; ++j)
      out[j] = ordered_std(rows, [&](int i) { return x[static_cast<long>(i) * cols + j] * inv_row[i]; },
                           [](int i) { return i % kPartials; });
  }
};

float imbalance(const std::vector<float>& col_std, const std::vector<float>& row_std) {
  const auto [col_min, col_max] = std::minmax_element(col_std.begin(), col_std.end());
  const auto [row_min, row_max] = std::minmax_element(row_std.begin(), row_std.end());
  return *col_max / std::max(*col_min, 1e-8f) + *row_max / std::max(*row_min, 1e-8f);
}

float step_log_scale(float log_scale, float std_dev) {
  return std::clamp(log_scale + portable::log(std::clamp(std_dev, kStdFloor, kStdCeil)), kLogScaleMin, kLogScaleMax);
}

void scale(const std::vector<float>& factor, const std::vector<float>& spread, std::vector<float>& out) {
  for (size_t k = 0; k < out.size(); ++k) out[k] = factor[k] * spread[k];
}

std::vector<float> exp_of(const std::vector<float>& log_scale) {
  std::vector<float> out(log_scale.size());
  for (size_t k = 0; k < out.size(); ++k) out[k] = portable::exp(log_scale[k]);
  return out;
}

}  // namespace

Normalization variance_normalize(const float* x, int rows, int cols, int iterations) {
  const Spreads spreads{x, rows, cols};
  std::vector<float> log_row(rows, 0.0f), log_col(cols, 0.0f), inv_row(rows, 1.0f), inv_col(cols, 1.0f);
  std::vector<float> row_spread(rows), col_spread(cols), row_std(rows), col_std(cols);
  spreads.of_rows(inv_col, row_std);
  spreads.of_columns(inv_row, col_std);

  Normalization best{std::vector<float>(cols, 1.0f), std::vector<float>(rows, 1.0f), imbalance(col_std, row_std), 0};
  for (int it = 1; it <= iterations; ++it) {
    for (int j = 0; j < cols; ++j) {
      log_col[j] = step_log_scale(log_col[j], col_std[j]);
      inv_col[j] = 1.0f / portable::exp(log_col[j]);
    }
    spreads.of_rows(inv_col, row_spread);
    scale(inv_row, row_spread, row_std);
    for (int i = 0; i < rows; ++i) {
      log_row[i] = step_log_scale(log_row[i], row_std[i]);
      inv_row[i] = 1.0f / portable::exp(log_row[i]);
    }
    scale(inv_row, row_spread, row_std);
    spreads.of_columns(inv_row, col_spread);
    scale(inv_col, col_spread, col_std);
    // Once the spreads are balanced the imbalance stays within float rounding of 2 while the scales still drift
    // (a common factor moves between rows and columns); exact arithmetic keeps the last such iterate, and the tie
    // margin lets float arithmetic do the same.
    const float current = imbalance(col_std, row_std);
    if (current <= best.imbalance * kTieMargin) best = {exp_of(log_col), exp_of(log_row), current, it};
  }
  return best;
}

}  // namespace kvarn::codec
