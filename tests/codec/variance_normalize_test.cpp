// The variance normalization equalizes row and column spreads, keeps the best iterate (never worse than doing
// nothing), agrees with the float64 reference, and is deterministic.
#include "codec/variance_normalize.h"

#include "codec/synthetic_kv.h"
#include "reference_codec.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace kvarn::codec
