// The variance normalization equalizes row and column spreads, keeps the best iterate (never worse than doing
// nothing), agrees with the float64 reference, is deterministic, and follows its documented summation order bit
// for bit (the CUDA flush reproduces that order; CI, which has no GPU, checks it here).
#include "codec/variance_normalize.h"

#include "codec/synthetic_kv.h"
#include "reference_codec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>

namespace kvarn::codec {
namespace {

test::Matrix to_matrix(const std::vector<float>& x, int rows, int cols) {
  test::Matrix m(rows, std::vector<double>(cols));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) m[i][j] = x[static_cast<size_t>(i) * cols + j];
  return m;
}

TEST(VarianceNormalize, ReducesImbalanceOfOutlierTiles) {
  const auto kv = synthetic_kv({.tokens = 128, .head_dim = 128, .seed = 3});
  const auto identity = variance_normalize(kv.keys.data(), 128, 128, 0);
  const auto norm = variance_normalize(kv.keys.data(), 128, 128);
  EXPECT_GT(norm.best_iteration, 0);
  EXPECT_LT(norm.imbalance, 0.2f * identity.imbalance);
}

TEST(VarianceNormalize, KeepsTheBestIterate) {
  // Columns with a tiny spread cannot be scaled up past e^0.3 (the clamp), so the iterates do not improve
  // monotonically; the result after k rounds is the best of the first k iterates, never worse than the identity.
  auto kv = synthetic_kv({.tokens = 32, .head_dim = 32, .seed = 9});
  for (int t = 0; t < 32; ++t)
    for (int c = 0; c < 4; ++c) kv.values[t * 32 + c] *= 0.01f;
  const auto identity = variance_normalize(kv.values.data(), 32, 32, 0);
  float previous = identity.imbalance;
  for (int iterations = 1; iterations <= 16; ++iterations) {
    const auto norm = variance_normalize(kv.values.data(), 32, 32, iterations);
    EXPECT_LE(norm.imbalance, previous) << iterations;
    previous = norm.imbalance;
    const auto ref = test::reference_normalize(to_matrix(kv.values, 32, 32), iterations);
    EXPECT_NEAR(norm.imbalance, ref.imbalance, 1e-4 * ref.imbalance) << iterations;
  }
}

TEST(VarianceNormalize, MatchesFloat64Reference) {
  const auto kv = synthetic_kv({.tokens = 64, .head_dim = 64, .seed = 11});
  const auto norm = variance_normalize(kv.values.data(), 64, 64);
  const auto ref = test::reference_normalize(to_matrix(kv.values, 64, 64));
  EXPECT_NEAR(norm.imbalance, ref.imbalance, 1e-4 * ref.imbalance);
  for (int j = 0; j < 64; ++j) EXPECT_NEAR(norm.col_scale[j], ref.col[j], 1e-4 * ref.col[j]);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(norm.row_scale[i], ref.row[i], 1e-4 * ref.row[i]);
}

TEST(VarianceNormalize, IsDeterministic) {
  const auto kv = synthetic_kv({.seed = 5});
  const auto a = variance_normalize(kv.keys.data(), 128, 128);
  const auto b = variance_normalize(kv.keys.data(), 128, 128);
  EXPECT_EQ(a.col_scale, b.col_scale);
  EXPECT_EQ(a.row_scale, b.row_scale);
}

// The order as a warp runs it, written out independently of the codec: lane k of 8 holds partial k (rows: the
// k-th chunk of consecutive terms; columns: every 8th term from k), adds its terms in order (deviations by fma),
// and the lanes meet in an xor butterfly. Row spreads of x * inv_col, column spreads of x * inv_row, scaled by the
// other side's factor to give cur's (the factored form of the spec's statistics).
struct WarpOrderNormalization {
  const std::vector<float>& x;
  int rows, cols;

  static float butterfly(std::array<float, 8> p) {
    for (int far : {4, 2, 1}) {
      std::array<float, 8> q;
      for (int k = 0; k < 8; ++k) q[k] = p[k] + p[k ^ far];
      p = q;
    }
    return p[0];
  }

  template <class Term, class Lane>
  static float spread(int n, Term term, Lane lane_of) {
    std::array<float, 8> sum{}, dev{};
    for (int i = 0; i < n; ++i) sum[lane_of(i)] += term(i);
    const float mean = butterfly(sum) / static_cast<float>(n);
    for (int i = 0; i < n; ++i) {
      const float d = term(i) - mean;
      dev[lane_of(i)] = std::fma(d, d, dev[lane_of(i)]);
    }
    return std::sqrt(butterfly(dev) / static_cast<float>(n - 1));
  }

  Normalization run() const {
    std::vector<float> col_scale(cols, 1), inv_col(cols, 1), col_std(cols), best_col_scale(cols, 1);
    std::vector<float> row_scale(rows, 1), inv_row(rows, 1), row_spread(rows), row_std(rows), best_row_scale(rows, 1);
    auto row_pass = [&] {
      for (int i = 0; i < rows; ++i)
        row_spread[i] = spread(cols, [&](int j) { return x[i * cols + j] * inv_col[j]; },
                               [&](int j) { return j / (cols / 8); });
    };
    auto column_pass = [&] {
      for (int j = 0; j < cols; ++j)
        col_std[j] = inv_col[j] * spread(rows, [&](int i) { return x[i * cols + j] * inv_row[i]; },
                                         [](int i) { return i % 8; });
    };
    auto imbalance = [&] {
      const auto [cmin, cmax] = std::minmax_element(col_std.begin(), col_std.end());
      const auto [rmin, rmax] = std::minmax_element(row_std.begin(), row_std.end());
      return *cmax / std::max(*cmin, 1e-8f) + *rmax / std::max(*rmin, 1e-8f);
    };
    auto step = [](float scale, float std_dev) {  // exp(log scale + log std), both clamped as the spec says
      return std::clamp(scale * std::clamp(std_dev, 1e-3f, 1e3f), kScaleMin, kScaleMax);
    };
    row_pass();
    row_std = row_spread;
    column_pass();
    float best = imbalance();
    int best_iteration = 0;
    for (int it = 1; it <= kNormalizationIterations; ++it) {
      for (int j = 0; j < cols; ++j) {
        col_scale[j] = step(col_scale[j], col_std[j]);
        inv_col[j] = 1 / col_scale[j];
      }
      row_pass();
      for (int i = 0; i < rows; ++i) {
        row_scale[i] = step(row_scale[i], inv_row[i] * row_spread[i]);
        inv_row[i] = 1 / row_scale[i];
        row_std[i] = inv_row[i] * row_spread[i];
      }
      column_pass();
      const float current = imbalance();
      if (current <= best * kTieMargin) {
        best = current, best_iteration = it;
        best_col_scale = col_scale, best_row_scale = row_scale;
      }
    }
    return {best_col_scale, best_row_scale, best, best_iteration};
  }
};

TEST(VarianceNormalize, ScaleBoundsAreTheSpecsLogBounds) {
  EXPECT_EQ(kScaleMin, static_cast<float>(std::exp(-0.3)));
  EXPECT_EQ(kScaleMax, static_cast<float>(std::exp(10.0)));
}

TEST(VarianceNormalize, FollowsTheWarpSummationOrderBitForBit) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (const auto& [rows, cols] : {std::pair{128, 128}, {128, 64}, {64, 128}, {64, 64}})
    for (int sample = 0; sample < 3; ++sample) {
      std::vector<float> x(static_cast<size_t>(rows) * cols);
      if (sample == 0) {
        const auto kv = synthetic_kv({.tokens = rows, .head_dim = cols, .seed = static_cast<uint64_t>(rows + cols)});
        x = kv.keys;
      } else {
        for (size_t i = 0; i < x.size(); ++i) x[i] = normal(rng) * (1.0f + static_cast<float>(i % cols % 7));
      }
      const Normalization want = WarpOrderNormalization{x, rows, cols}.run();
      const Normalization got = variance_normalize(x.data(), rows, cols);
      EXPECT_EQ(got.best_iteration, want.best_iteration) << rows << "x" << cols << " sample " << sample;
      EXPECT_EQ(got.imbalance, want.imbalance) << rows << "x" << cols << " sample " << sample;
      EXPECT_EQ(got.col_scale, want.col_scale) << rows << "x" << cols << " sample " << sample;
      EXPECT_EQ(got.row_scale, want.row_scale) << rows << "x" << cols << " sample " << sample;
    }
}

}  // namespace
}  // namespace kvarn::codec
