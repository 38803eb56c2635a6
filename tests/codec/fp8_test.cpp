// FP8 E4M3: every finite code round-trips, conversion rounds to nearest even and saturates at 448.
#include "codec/fp8.h"

#include <gtest/gtest.h>

#include <cmath>

namespace kvarn::codec {
namespace {

TEST(Fp8E4m3, EveryFiniteCodeRoundTrips) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;  // NaN
    const float value = e4m3_to_float(static_cast<uint8_t>(code));
    if (code == 0x80) continue;  // -0 encodes back to -0 (0x80) but compare as values
    ASSERT_EQ(float_to_e4m3(value), code) << code << " " << value;
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8E4m3, RoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.0625f)), 1.0f);   // halfway between 1 and 1.125 -> even
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.1875f)), 1.25f);  // halfway between 1.125 and 1.25 -> even
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1e9f)), 448.0f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(-500.0f)), -448.0f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(15.5f)), 16.0f);  // mantissa carry into the next exponent
  EXPECT_TRUE(std::isnan(e4m3_to_float(float_to_e4m3(NAN))));
}

}  // namespace
}  // namespace kvarn::codec
