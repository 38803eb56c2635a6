// Round-to-nearest per row and the bit packing of codes: packing round-trips exactly and follows the spec's bit
// order; ties round half to even; a constant row has scale 1e-10 and codes 0.
#include "codec/rtn.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace kvarn::codec {
namespace {

TEST(PackCodes, RoundTripsExactly) {
  std::mt19937 rng(7);
  for (int bits : {2, 4, 8}) {
    for (int n : {8, 64, 128, 512}) {
      std::vector<uint8_t> codes(n), back(n), packed(n * bits / 8);
      for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
      pack_codes(codes.data(), n, bits, packed.data());
      unpack_codes(packed.data(), n, bits, back.data());
      ASSERT_EQ(codes, back) << "bits=" << bits << " n=" << n;
    }
  }
}

TEST(PackCodes, LowerIndexInLowerBits) {
  const uint8_t four[] = {0x1, 0x2, 0x3, 0xf};
  uint8_t packed4[2];
  pack_codes(four, 4, 4, packed4);
  EXPECT_EQ(packed4[0], 0x21);
  EXPECT_EQ(packed4[1], 0xf3);
  const uint8_t two[] = {1, 2, 3, 0};
  uint8_t packed2[1];
  pack_codes(two, 4, 2, packed2);
  EXPECT_EQ(packed2[0], 0b00111001);
}

TEST(QuantizeRow, MapsMinAndMaxToTheEndCodes) {
  const float row[] = {-1.0f, 0.0f, 2.0f, 0.5f};
  uint8_t codes[4];
  const RowRange range = quantize_row(row, 4, 2, codes);
  EXPECT_FLOAT_EQ(range.lo, -1.0f);
  EXPECT_FLOAT_EQ(range.scale, 1.0f);
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 1);
  EXPECT_EQ(codes[2], 3);
  EXPECT_EQ(codes[3], 2);  // 1.5 rounds half to even: 2
}

TEST(QuantizeRow, ConstantRowClampsScale) {
  const float row[] = {3.0f, 3.0f, 3.0f, 3.0f};
  uint8_t codes[4];
  const RowRange range = quantize_row(row, 4, 4, codes);
  EXPECT_FLOAT_EQ(range.scale, 1e-10f);
  EXPECT_FLOAT_EQ(range.lo, 3.0f);
  for (uint8_t c : codes) EXPECT_EQ(c, 0);
}

}  // namespace
}  // namespace kvarn::codec
