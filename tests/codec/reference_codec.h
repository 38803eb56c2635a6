#pragma once
// An independent float64 implementation of the KVarN spec (steps 1-5), written straight from
// ../shared/spec/kvarn-format.md with no code shared with src/codec: the oracle for the codec tests.
#include <algorithm>
#include <cmath>
#include <vector>

namespace kvarn::test {

using Matrix = std::vector<std::vector<double>>;  // [rows][cols]

inline void reference_hadamard(std::vector<double>& x) {
  const size_t d = x.size();
  for (size_t step = 1; step < d; step *= 2)
    for (size_t i = 0; i < d; ++i)
      if ((i & step) == 0) {
        const double a = x[i], b = x[i + step];
        x[i] = a + b;
        x[i + step] = a - b;
      }
  for (double& v : x) v /= std::sqrt(static_cast<double>(d));
}

inline double reference_std(const std::vector<double>& v) {
  double mean = 0;
  for (double x : v) mean += x;
  mean /= v.size();
  double dev = 0;
  for (double x : v) dev += (x - mean) * (x - mean);
  return std::sqrt(dev / (v.size() - 1));
}

struct ReferenceNormalization {
  std::vector<double> col, row;
  double imbalance;
};

inline ReferenceNormalization reference_normalize(const Matrix& x, int iterations = 16) {
  const size_t rows = x.size(), cols = x[0].size();
  std::vector<double> log_col(cols, 0.0), log_row(rows, 0.0);
  auto current = [&] {
    Matrix cur(rows, std::vector<double>(cols));
    for (size_t i = 0; i < rows; ++i)
      for (size_t j = 0; j < cols; ++j) cur[i][j] = x[i][j] / std::exp(log_col[j]) / std::exp(log_row[i]);
    return cur;
  };
  auto col_std = [&](const Matrix& m) {
    std::vector<double> out(cols);
    for (size_t j = 0; j < cols; ++j) {
      std::vector<double> column(rows);
      for (size_t i = 0; i < rows; ++i) column[i] = m[i][j];
      out[j] = reference_std(column);
    }
    return out;
  };
  auto row_std = [&](const Matrix& m) {
    std::vector<double> out(rows);
    for (size_t i = 0; i < rows; ++i) out[i] = reference_std(m[i]);
    return out;
  };
  auto imbalance = [&](const Matrix& m) {
    const auto c = col_std(m), r = row_std(m);
    return *std::max_element(c.begin(), c.end()) / std::max(*std::min_element(c.begin(), c.end()), 1e-8) +
           *std::max_element(r.begin(), r.end()) / std::max(*std::min_element(r.begin(), r.end()), 1e-8);
  };
  auto exps = [](const std::vector<double>& v) {
    std::vector<double> out(v.size());
    for (size_t k = 0; k < v.size(); ++k) out[k] = std::exp(v[k]);
    return out;
  };
  Matrix cur = current();
  ReferenceNormalization best{exps(log_col), exps(log_row), imbalance(cur)};
  for (int it = 0; it < iterations; ++it) {
    const auto cs = col_std(cur);
    for (size_t j = 0; j < cols; ++j)
      log_col[j] = std::clamp(log_col[j] + std::log(std::clamp(cs[j], 1e-3, 1e3)), -0.3, 10.0);
    cur = current();
    const auto rs = row_std(cur);
    for (size_t i = 0; i < rows; ++i)
      log_row[i] = std::clamp(log_row[i] + std::log(std::clamp(rs[i], 1e-3, 1e3)), -0.3, 10.0);
    cur = current();
    const double imb = imbalance(cur);
    if (imb <= best.imbalance) best = {exps(log_col), exps(log_row), imb};
  }
  return best;
}

// One quantized matrix: x[r][c] ~= outer[c] * (a[r] * codes[r][c] + z[r]).
struct ReferenceQuantized {
  std::vector<std::vector<int>> codes;
  std::vector<double> a, z, outer;

  Matrix dequantize() const {
    Matrix x(codes.size(), std::vector<double>(outer.size()));
    for (size_t r = 0; r < codes.size(); ++r)
      for (size_t c = 0; c < outer.size(); ++c) x[r][c] = outer[c] * (a[r] * codes[r][c] + z[r]);
    return x;
  }
};

inline ReferenceQuantized reference_quantize(const Matrix& x, int bits, bool normalize) {
  const size_t rows = x.size(), cols = x[0].size();
  ReferenceNormalization norm = normalize ? reference_normalize(x)
                                          : ReferenceNormalization{std::vector<double>(cols, 1.0),
                                                                   std::vector<double>(rows, 1.0), 0.0};
  ReferenceQuantized q{std::vector<std::vector<int>>(rows, std::vector<int>(cols)), std::vector<double>(rows),
                       std::vector<double>(rows), norm.col};
  const double max_code = (1 << bits) - 1;
  for (size_t r = 0; r < rows; ++r) {
    std::vector<double> b(cols);
    for (size_t c = 0; c < cols; ++c) b[c] = x[r][c] / norm.col[c] / norm.row[r];
    const double lo = *std::min_element(b.begin(), b.end()), hi = *std::max_element(b.begin(), b.end());
    const double scale = std::max((hi - lo) / max_code, 1e-10);
    for (size_t c = 0; c < cols; ++c)
      q.codes[r][c] = static_cast<int>(std::clamp(std::nearbyint((b[c] - lo) / scale), 0.0, max_code));
    q.a[r] = norm.row[r] * scale;
    q.z[r] = norm.row[r] * lo;
  }
  return q;
}

}  // namespace kvarn::test
