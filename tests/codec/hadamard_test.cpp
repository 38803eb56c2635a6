// H_D is orthonormal, symmetric and its own inverse, for every supported head_dim; it preserves dot products,
// which is why keys and queries can both be stored rotated.
#include "codec/hadamard.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace kvarn::codec {
namespace {

class HadamardTest : public ::testing::TestWithParam<int> {};

TEST_P(HadamardTest, IsOrthonormalAndSymmetric) {
  const int d = GetParam();
  std::vector<std::vector<float>> h(d, std::vector<float>(d, 0.0f));  // column j = H e_j
  for (int j = 0; j < d; ++j) {
    h[j][j] = 1.0f;
    hadamard_rotate(h[j].data(), d);
  }
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) {
      double dot = 0;
      for (int k = 0; k < d; ++k) dot += static_cast<double>(h[i][k]) * h[j][k];
      ASSERT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-6) << i << "," << j;
      ASSERT_FLOAT_EQ(h[i][j], h[j][i]);
    }
}

TEST_P(HadamardTest, IsSelfInverseAndPreservesDotProducts) {
  const int d = GetParam();
  std::mt19937 rng(d);
  std::normal_distribution<float> normal;
  std::vector<float> x(d), y(d);
  for (int i = 0; i < d; ++i) x[i] = normal(rng), y[i] = normal(rng);
  auto rx = x, ry = y;
  hadamard_rotate(rx.data(), d);
  hadamard_rotate(ry.data(), d);
  double dot = 0, rdot = 0;
  for (int i = 0; i < d; ++i) dot += x[i] * y[i], rdot += rx[i] * ry[i];
  EXPECT_NEAR(rdot, dot, 1e-4 * d);
  hadamard_rotate(rx.data(), d);
  for (int i = 0; i < d; ++i) ASSERT_NEAR(rx[i], x[i], 1e-5);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, HadamardTest, ::testing::Values(8, 16, 32, 64, 128, 256, 512));

}  // namespace
}  // namespace kvarn::codec
