// portable::exp and portable::log are within a few float ulps of the true functions over the ranges the codec
// uses (log of a clamped spread in [1e-3, 1e3], exp of a clamped log-scale in [-0.3, 10] and beyond), exact
// where the normalization relies on it (exp(0) = 1: the identity iterate's scales), and monotone.
#include "codec/portable_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace kvarn::codec {
namespace {

constexpr double kMaxRelativeError = 0x1p-21;

TEST(PortableMath, LogIsAccurateFromOneThousandthToOneThousand) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> exponent(std::log(1e-3), std::log(1e3));
  double worst = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = static_cast<float>(std::exp(exponent(rng)));
    const double want = std::log(static_cast<double>(x));
    worst = std::max(worst, std::fabs(portable::log(x) - want) / std::max(std::fabs(want), 1e-3));
  }
  EXPECT_LE(worst, kMaxRelativeError);
  EXPECT_EQ(portable::log(1.0f), 0.0f);
  for (float x : {0.5f, 2.0f, 1024.0f, 1e-3f, 1e3f, 1.41421354f, 1.41421366f})
    EXPECT_NEAR(portable::log(x), std::log(static_cast<double>(x)), 4e-7 * std::fabs(std::log(x)) + 1e-9) << x;
}

TEST(PortableMath, ExpIsAccurateOverTheLogScaleRange) {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> uniform(-12.0f, 12.0f);
  double worst = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = uniform(rng);
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(portable::exp(x) - want) / want);
  }
  EXPECT_LE(worst, kMaxRelativeError);
  EXPECT_EQ(portable::exp(0.0f), 1.0f);
}

TEST(PortableMath, IsMonotone) {
  float previous_log = portable::log(1e-3f), previous_exp = portable::exp(-0.3f);
  for (float x = 1e-3f; x < 1e3f; x = std::nextafter(x * 1.0001f, 2e3f)) {
    const float l = portable::log(x);
    EXPECT_GE(l, previous_log) << x;
    previous_log = l;
  }
  for (float x = -0.3f; x < 10.0f; x += 1e-4f) {
    const float e = portable::exp(x);
    EXPECT_GE(e, previous_exp) << x;
    previous_exp = e;
  }
}

}  // namespace
}  // namespace kvarn::codec
