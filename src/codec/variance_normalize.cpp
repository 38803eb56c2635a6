#include "codec/variance_normalize.h"

#include <algorithm>
#include <cmath>

namespace kvarn::codec {

namespace {

// The order of every sum below is part of the codec: the CUDA flush kernel reproduces it bit for bit with one
// warp lane per partial. A row's terms go to 8 partials in chunks of consecutive terms, a column's terms to 8
// strided partials (row i to partial i mod 8); each partial adds its terms in order, squared deviations by fma,
// and the 8 partials meet in a halving tree. Standard deviations are two-pass (mean, then squared deviations):
// one-pass sums of squares cancel badly on tiles with a 100x attention-sink token.
constexpr int kPartials = kSumPartials;

// Unbiased standard deviation of every line of a matrix stored term-major, a[t][l] (terms x lines), each term
// scaled by factor[t] and summed into partial part(t); the loops run along the lines so that they vectorize.
template <class Part>
void line_stds(const float* a, int terms, int lines, const std::vector<float>& factor, Part part,
               std::vector<float>& out) {
  std::vector<float> partials(static_cast<size_t>(kPartials) * lines), mean(lines);
  auto tree_sum = [&](auto&& each_line) {
    for (int half = kPartials / 2; half > 0; half /= 2)
      for (int k = 0; k < half; ++k)
        for (int l = 0; l < lines; ++l) partials[k * lines + l] += partials[(k + half) * lines + l];
    for (int l = 0; l < lines; ++l) each_line(l, partials[l]);
  };
  std::fill(partials.begin(), partials.end(), 0.0f);
  for (int t = 0; t < terms; ++t) {
    const float* in = a + static_cast<long>(t) * lines;
    float* sum = partials.data() + static_cast<long>(part(t)) * lines;
    for (int l = 0; l < lines; ++l) sum[l] += in[l] * factor[t];
  }
  tree_sum([&](int l, float total) { mean[l] = total / static_cast<float>(terms); });
  std::fill(partials.begin(), partials.end(), 0.0f);
  for (int t = 0; t < terms; ++t) {
    const float* in = a + static_cast<long>(t) * lines;
    float* dev = partials.data() + static_cast<long>(part(t)) * lines;
    for (int l = 0; l < lines; ++l) {
      const float d = in[l] * factor[t] - mean[l];
      dev[l] = std::fma(d, d, dev[l]);
    }
  }
  tree_sum([&](int l, float total) { out[l] = std::sqrt(total / static_cast<float>(terms - 1)); });
}

// cur = x * inv_col[col] * inv_row[row] has row i's standard deviation inv_row[i] * row_spread[i] and column j's
// inv_col[j] * col_spread[j], where the spreads are those of x * inv_col (rows) and of x * inv_row (columns).
// So a column step needs one pass over the rows and a row step one pass over the columns, each multiplying by a
// single factor; the spec's cur is never formed. The rows are walked in a transposed copy.
struct Spreads {
  const float* x;
  int rows, cols;
  std::vector<float> x_transposed;

  Spreads(const float* x_, int rows_, int cols_)
      : x(x_), rows(rows_), cols(cols_), x_transposed(static_cast<size_t>(rows_) * cols_) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j)
        x_transposed[static_cast<size_t>(j) * rows + i] = x[static_cast<size_t>(i) * cols + j];
  }

  void of_rows(const std::vector<float>& inv_col, std::vector<float>& out) const {
    const int chunk = (cols + kPartials - 1) / kPartials;
    line_stds(x_transposed.data(), cols, rows, inv_col, [chunk](int j) { return j / chunk; }, out);
  }

  void of_columns(const std::vector<float>& inv_row, std::vector<float>& out) const {
    line_stds(x, rows, cols, inv_row, [](int i) { return i % kPartials; }, out);
  }
};

float imbalance(const std::vector<float>& col_std, const std::vector<float>& row_std) {
  const auto [col_min, col_max] = std::minmax_element(col_std.begin(), col_std.end());
  const auto [row_min, row_max] = std::minmax_element(row_std.begin(), row_std.end());
  return *col_max / std::max(*col_min, 1e-8f) + *row_max / std::max(*row_min, 1e-8f);
}

// The spec's step, log_scale = clamp(log_scale + log(clamp(std, 1e-3, 1e3)), -0.3, 10), is (exp being monotone)
// scale = clamp(scale * clamp(std, 1e-3, 1e3), e^-0.3, e^10): the scales are updated by multiplication, with no
// log or exp at all (libm's and the device's expf / logf differ in the last ulp often enough to change which
// iterate a tile keeps).
float step_scale(float scale, float std_dev) {
  return std::clamp(scale * std::clamp(std_dev, kStdFloor, kStdCeil), kScaleMin, kScaleMax);
}

void multiply(const std::vector<float>& factor, const std::vector<float>& spread, std::vector<float>& out) {
  for (size_t k = 0; k < out.size(); ++k) out[k] = factor[k] * spread[k];
}

}  // namespace

Normalization variance_normalize(const float* x, int rows, int cols, int iterations) {
  const Spreads spreads(x, rows, cols);
  std::vector<float> row_scale(rows, 1.0f), col_scale(cols, 1.0f), inv_row(rows, 1.0f), inv_col(cols, 1.0f);
  std::vector<float> row_spread(rows), col_spread(cols), row_std(rows), col_std(cols);
  spreads.of_rows(inv_col, row_std);
  spreads.of_columns(inv_row, col_std);

  Normalization best{col_scale, row_scale, imbalance(col_std, row_std), 0};
  for (int it = 1; it <= iterations; ++it) {
    for (int j = 0; j < cols; ++j) {
      col_scale[j] = step_scale(col_scale[j], col_std[j]);
      inv_col[j] = 1.0f / col_scale[j];
    }
    spreads.of_rows(inv_col, row_spread);
    multiply(inv_row, row_spread, row_std);
    for (int i = 0; i < rows; ++i) {
      row_scale[i] = step_scale(row_scale[i], row_std[i]);
      inv_row[i] = 1.0f / row_scale[i];
    }
    multiply(inv_row, row_spread, row_std);
    spreads.of_columns(inv_row, col_spread);
    multiply(inv_col, col_spread, col_std);
    // Once the spreads are balanced the imbalance stays within float rounding of 2 while the scales still drift
    // (a common factor moves between rows and columns); exact arithmetic keeps the last such iterate, and the tie
    // margin lets float arithmetic do the same.
    const float current = imbalance(col_std, row_std);
    if (current <= best.imbalance * kTieMargin) best = {col_scale, row_scale, current, it};
  }
  return best;
}

}  // namespace kvarn::codec
