// TileCodec: the tile byte sizes of the spec; conformance with the float64 reference implementation; the error
// budget; determinism; edge tiles; and refusal of bad input.
#include "codec/tile_codec.h"

#include "codec/hadamard.h"
#include "codec/rtn.h"
#include "codec/synthetic_kv.h"
#include "reference_codec.h"
#include "util/error.h"
#include "util/half.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

namespace kvarn::codec {
namespace {

// ---- helpers: read a code tile's fields back from its bytes -------------------------------------------------
std::vector<float> halves(const std::vector<uint8_t>& tile, size_t offset, int n) {
  std::vector<float> out(n);
  for (int i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, tile.data() + offset + 2 * i, 2);
    out[i] = half_to_float(h);
  }
  return out;
}

std::vector<std::vector<int>> codes_of(const std::vector<uint8_t>& tile, size_t offset, int rows, int cols, int bits) {
  std::vector<std::vector<int>> out(rows, std::vector<int>(cols));
  std::vector<uint8_t> row(cols);
  for (int r = 0; r < rows; ++r) {
    unpack_codes(tile.data() + offset + static_cast<size_t>(r) * cols * bits / 8, cols, bits, row.data());
    for (int c = 0; c < cols; ++c) out[r][c] = row[c];
  }
  return out;
}

test::Matrix matrix(const std::vector<float>& x, int rows, int cols, bool transposed) {
  test::Matrix m(transposed ? cols : rows, std::vector<double>(transposed ? rows : cols));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) (transposed ? m[j][i] : m[i][j]) = x[static_cast<size_t>(i) * cols + j];
  return m;
}

std::vector<float> rotated(std::vector<float> x, int head_dim) {
  hadamard_rotate_rows(x.data(), static_cast<int>(x.size()) / head_dim, head_dim);
  return x;
}

double relative_error(const std::vector<float>& approx, const std::vector<float>& exact) {
  double num = 0, den = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    num += (static_cast<double>(approx[i]) - exact[i]) * (static_cast<double>(approx[i]) - exact[i]);
    den += static_cast<double>(exact[i]) * exact[i];
  }
  return std::sqrt(num / den);
}

struct RoundTrip {
  std::vector<uint8_t> tile;
  std::vector<float> keys, values;  // decoded, storage space
};

RoundTrip round_trip(const TileCodec& codec, const std::vector<float>& keys, const std::vector<float>& values) {
  const auto& l = codec.layout();
  RoundTrip r{std::vector<uint8_t>(l.bytes, 0xcd), std::vector<float>(keys.size(), NAN),
              std::vector<float>(values.size(), NAN)};
  codec.encode(keys.data(), values.data(), r.tile.data());
  codec.decode(r.tile.data(), r.keys.data(), r.values.data());
  return r;
}

// ---- tile sizes ----------------------------------------------------------------------------------------------
TEST(TileCodec, TileBytesEqualTheSpecTable) {
  const std::pair<const char*, std::pair<size_t, size_t>> table[] = {
      {"kvarn_k4v2_g128", {13824, 7296}}, {"kvarn_k4v4_g128", {17920, 9344}},
      {"kvarn_k4v2_g64", {7296, 3840}},   {"kvarn_k4v4_g64", {9344, 4864}},
      {"rtn_k4v2_g128", {13824, 7296}},   {"rot_k4v2_g128", {13824, 7296}}};
  for (const auto& [name, bytes] : table) {
    const auto dtype = parse_cache_dtype(name);
    EXPECT_EQ(TileCodec(dtype, 128, dtype.tile_tokens).layout().bytes, bytes.first) << name;
    EXPECT_EQ(TileCodec(dtype, 64, dtype.tile_tokens).layout().bytes, bytes.second) << name;
  }
  EXPECT_EQ(TileCodec(parse_cache_dtype("fp16"), 128, 128).layout().bytes, 65536u);
  EXPECT_EQ(TileCodec(parse_cache_dtype("fp8"), 128, 128).layout().bytes, 32768u);
}

// ---- conformance with the float64 reference --------------------------------------------------------------------
struct ConformanceCase {
  const char* dtype;
  int head_dim;
  bool outliers;
};

class Conformance : public ::testing::TestWithParam<ConformanceCase> {};

// Codes equal the reference's except within float rounding of a rounding boundary (budget: 0.2% of codes, and
// off by one at most); the fp16 scales are the reference's rounded to fp16 (budget: 1 ulp, 2^-10 relative).
TEST_P(Conformance, CodesAndScalesMatchTheFloat64Reference) {
  const auto [name, d, outliers] = GetParam();
  const auto dtype = parse_cache_dtype(name);
  const int g = dtype.tile_tokens;
  const auto kv = outliers ? synthetic_kv({.tokens = g, .head_dim = d, .sink_min = 8, .sink_max = 8, .seed = 21})
                           : synthetic_kv({.tokens = g, .head_dim = d, .outlier_channels = 0, .sink_tokens = {},
                                           .seed = 22});
  const TileCodec codec(dtype, d, g);
  const auto& l = codec.layout();
  const auto r = round_trip(codec, kv.keys, kv.values);

  const auto keys = dtype.rotated() ? rotated(kv.keys, d) : kv.keys;
  const auto values = dtype.rotated() ? rotated(kv.values, d) : kv.values;
  const auto ref_k = test::reference_quantize(matrix(keys, g, d, true), dtype.key_bits, dtype.normalized());
  const auto ref_v = test::reference_quantize(matrix(values, g, d, false), dtype.value_bits, dtype.normalized());

  auto check = [&](const test::ReferenceQuantized& ref, size_t codes_at, size_t a_at, size_t z_at, size_t outer_at,
                   int rows, int cols, int bits, const char* what) {
    const auto codes = codes_of(r.tile, codes_at, rows, cols, bits);
    int mismatches = 0;
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j)
        if (codes[i][j] != ref.codes[i][j]) {
          ++mismatches;
          EXPECT_LE(std::abs(codes[i][j] - ref.codes[i][j]), 1) << what << " " << i << "," << j;
        }
    EXPECT_LE(mismatches, 0.002 * rows * cols) << what;
    const auto a = halves(r.tile, a_at, rows), z = halves(r.tile, z_at, rows), outer = halves(r.tile, outer_at, cols);
    for (int i = 0; i < rows; ++i) {
      EXPECT_NEAR(a[i], ref.a[i], std::ldexp(std::fabs(ref.a[i]), -10) + 1e-7) << what << " a row " << i;
      EXPECT_NEAR(z[i], ref.z[i], std::ldexp(std::fabs(ref.z[i]), -10) + 1e-7) << what << " z row " << i;
    }
    for (int j = 0; j < cols; ++j) EXPECT_NEAR(outer[j], ref.outer[j], std::ldexp(ref.outer[j], -10)) << what;
  };
  check(ref_k, l.key_codes, l.key_scale, l.key_zero, l.key_token_scale, d, g, dtype.key_bits, "keys");
  check(ref_v, l.value_codes, l.value_scale, l.value_zero, l.value_channel_scale, g, d, dtype.value_bits, "values");
}

INSTANTIATE_TEST_SUITE_P(Presets, Conformance,
                         ::testing::Values(ConformanceCase{"kvarn_k4v2_g128", 128, true},
                                           ConformanceCase{"kvarn_k4v2_g128", 128, false},
                                           ConformanceCase{"kvarn_k4v4_g128", 128, true},
                                           ConformanceCase{"kvarn_k4v2_g64", 64, true},
                                           ConformanceCase{"kvarn_k4v4_g64", 256, false},
                                           ConformanceCase{"kvarn_k4v2_g128", 8, false},
                                           ConformanceCase{"rtn_k4v2_g128", 128, true},
                                           ConformanceCase{"rot_k4v2_g128", 128, true}));

// ---- error budget --------------------------------------------------------------------------------------------
// Relative Frobenius error of decode(encode(x)) on synthetic K/V with outlier channels and a sink token. The
// budget: within 2% of what the float64 reference reaches (fp16 scales cost a little), and absolute ceilings from
// uniform-quantization noise (step/sqrt(12) over a row range of ~5 sigma: ~0.1 at 4 bits, ~0.5 at 2 bits).
TEST(TileCodec, ErrorWithinBudgetOfTheFloat64Reference) {
  const struct { const char* name; double key_budget, value_budget; } cases[] = {
      {"kvarn_k4v2_g128", 0.10, 0.60}, {"kvarn_k4v4_g128", 0.10, 0.13}, {"kvarn_k4v2_g64", 0.10, 0.60}};
  for (const auto& c : cases) {
    const auto dtype = parse_cache_dtype(c.name);
    const int g = dtype.tile_tokens, d = 128;
    const auto kv = synthetic_kv({.tokens = g, .head_dim = d, .seed = 31});
    const auto r = round_trip(TileCodec(dtype, d, g), kv.keys, kv.values);
    const auto keys = rotated(kv.keys, d), values = rotated(kv.values, d);
    const auto ref_k = test::reference_quantize(matrix(keys, g, d, true), dtype.key_bits, true).dequantize();
    const auto ref_v = test::reference_quantize(matrix(values, g, d, false), dtype.value_bits, true).dequantize();
    std::vector<float> ref_keys(keys.size()), ref_values(values.size());
    for (int t = 0; t < g; ++t)
      for (int ch = 0; ch < d; ++ch) {
        ref_keys[t * d + ch] = static_cast<float>(ref_k[ch][t]);
        ref_values[t * d + ch] = static_cast<float>(ref_v[t][ch]);
      }
    const double key_error = relative_error(r.keys, keys), value_error = relative_error(r.values, values);
    EXPECT_LE(key_error, 1.02 * relative_error(ref_keys, keys) + 1e-4) << c.name;
    EXPECT_LE(value_error, 1.02 * relative_error(ref_values, values) + 1e-4) << c.name;
    EXPECT_LT(key_error, c.key_budget) << c.name;
    EXPECT_LT(value_error, c.value_budget) << c.name;
  }
}

TEST(TileCodec, IsDeterministic) {
  const auto kv = synthetic_kv({.seed = 41});
  const TileCodec codec(parse_cache_dtype("kvarn_k4v2_g128"), 128, 128);
  EXPECT_EQ(round_trip(codec, kv.keys, kv.values).tile, round_trip(codec, kv.keys, kv.values).tile);
}

TEST(TileCodec, EncodeStoredSkipsOnlyTheRotation) {
  const auto kv = synthetic_kv({.seed = 43});
  const TileCodec codec(parse_cache_dtype("kvarn_k4v2_g128"), 128, 128);
  std::vector<uint8_t> stored(codec.layout().bytes);
  codec.encode_stored(rotated(kv.keys, 128).data(), rotated(kv.values, 128).data(), stored.data());
  EXPECT_EQ(stored, round_trip(codec, kv.keys, kv.values).tile);
}

// ---- baselines ---------------------------------------------------------------------------------------------------
TEST(TileCodec, Fp16StoresHalfRoundedValues) {
  const auto kv = synthetic_kv({.tokens = 16, .head_dim = 64, .seed = 51});
  const auto r = round_trip(TileCodec(parse_cache_dtype("fp16"), 64, 16), kv.keys, kv.values);
  for (size_t i = 0; i < kv.keys.size(); ++i) {
    ASSERT_EQ(r.keys[i], round_to_half(kv.keys[i]));
    ASSERT_EQ(r.values[i], round_to_half(kv.values[i]));
  }
}

TEST(TileCodec, Fp32StoresValuesExactly) {
  const auto kv = synthetic_kv({.tokens = 16, .head_dim = 32, .seed = 52});
  const auto r = round_trip(TileCodec(parse_cache_dtype("fp32"), 32, 16), kv.keys, kv.values);
  EXPECT_EQ(r.keys, kv.keys);
  EXPECT_EQ(r.values, kv.values);
}

TEST(TileCodec, Fp8UsesItsPerTensorScaleAndSaturates) {
  std::vector<float> keys(8 * 8, 1.0f), values(8 * 8, -3.0f);
  keys[0] = 1e6f;
  const auto r = round_trip(TileCodec(parse_cache_dtype("fp8"), 8, 8, 0.5f), keys, values);
  EXPECT_EQ(r.keys[0], 448.0f * 0.5f);
  EXPECT_EQ(r.keys[1], 1.0f);
  EXPECT_EQ(r.values[5], -3.0f);
}

// ---- edge tiles ----------------------------------------------------------------------------------------------------
class EdgeTiles : public ::testing::TestWithParam<const char*> {
protected:
  TileCodec codec{parse_cache_dtype(GetParam()), 128, parse_cache_dtype(GetParam()).tile_tokens};
  int g = codec.layout().tokens, d = 128;
  std::vector<float> filled(float value) const { return std::vector<float>(static_cast<size_t>(g) * d, value); }
  std::vector<float> stored(const std::vector<float>& x) const { return codec.dtype().rotated() ? rotated(x, d) : x; }
  static float max_abs(const std::vector<float>& x) {
    float m = 0;
    for (float v : x) m = std::max(m, std::fabs(v));
    return m;
  }
};

TEST_P(EdgeTiles, AllZerosDecodeToZeros) {
  const auto r = round_trip(codec, filled(0), filled(0));
  for (size_t i = 0; i < r.keys.size(); ++i) {
    ASSERT_EQ(r.keys[i], 0.0f);
    ASSERT_EQ(r.values[i], 0.0f);
  }
}

TEST_P(EdgeTiles, ConstantTileDecodesToTheConstant) {
  // Unrotated, every row is constant: scale clamps to 1e-10, codes are 0 and z holds the constant exactly.
  // Rotated, a constant vector becomes c*sqrt(D) in channel 0 and zeros elsewhere: exact up to the fp16 rounding
  // of the folded scales (budget: 2^-9 of the tile's largest magnitude).
  const auto r = round_trip(codec, filled(0.75f), filled(-2.5f));
  const auto keys = stored(filled(0.75f)), values = stored(filled(-2.5f));
  const float key_tol = codec.dtype().rotated() ? std::ldexp(max_abs(keys), -9) : 0.0f;
  const float value_tol = codec.dtype().rotated() ? std::ldexp(max_abs(values), -9) : 0.0f;
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_NEAR(r.keys[i], keys[i], key_tol) << i;
    ASSERT_NEAR(r.values[i], values[i], value_tol) << i;
  }
}

TEST_P(EdgeTiles, OneHugeOutlierStaysFiniteAndRepresented) {
  auto kv = synthetic_kv({.tokens = g, .head_dim = d, .outlier_channels = 0, .sink_tokens = {}, .seed = 61});
  kv.keys[5 * d + 17] = 3e4f;
  kv.values[9 * d + 3] = -3e4f;
  const auto r = round_trip(codec, kv.keys, kv.values);
  for (size_t i = 0; i < r.keys.size(); ++i) ASSERT_TRUE(std::isfinite(r.keys[i]) && std::isfinite(r.values[i])) << i;
  // The outlier dominates the tile's energy: it must survive (whole-tile relative error small).
  EXPECT_LT(relative_error(r.keys, stored(kv.keys)), 0.15);
  if (codec.dtype().rotated()) {
    EXPECT_LT(relative_error(r.values, stored(kv.values)), 0.6);
  }
}

TEST_P(EdgeTiles, Fp16MaxValuesStayFinite) {
  std::mt19937 rng(71);
  auto keys = filled(65504.0f), values = filled(65504.0f);
  for (auto& x : keys) x = (rng() & 1) ? x : -x;
  for (auto& x : values) x = (rng() & 1) ? x : -x;
  const auto r = round_trip(codec, keys, values);
  for (size_t i = 0; i < r.keys.size(); ++i) ASSERT_TRUE(std::isfinite(r.keys[i]) && std::isfinite(r.values[i])) << i;
  EXPECT_LT(relative_error(r.keys, stored(keys)), 0.15);
  EXPECT_LT(relative_error(r.values, stored(values)), 0.6);
}

TEST_P(EdgeTiles, AttentionSinkTokenKeepsItsMagnitude) {
  const auto kv = synthetic_kv({.tokens = g, .head_dim = d, .sink_min = 100, .sink_max = 100, .seed = 81});
  const auto r = round_trip(codec, kv.keys, kv.values);
  const auto keys = stored(kv.keys);
  double sink_norm = 0, decoded_norm = 0;
  for (int c = 0; c < d; ++c) sink_norm += keys[c] * keys[c], decoded_norm += r.keys[c] * r.keys[c];
  EXPECT_NEAR(std::sqrt(decoded_norm), std::sqrt(sink_norm), 0.05 * std::sqrt(sink_norm));
}

INSTANTIATE_TEST_SUITE_P(CodeDtypes, EdgeTiles,
                         ::testing::Values("kvarn_k4v2_g128", "kvarn_k4v4_g64", "rtn_k4v2_g128", "rot_k4v2_g128"));

// ---- bad input -------------------------------------------------------------------------------------------------
TEST(TileCodec, RefusesNonFiniteInput) {
  for (const char* name : {"kvarn_k4v2_g128", "fp16", "fp8_e4m3"}) {
    const TileCodec codec(parse_cache_dtype(name), 128, 128);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      std::vector<float> keys(128 * 128, 1.0f), values(128 * 128, 1.0f), out(128 * 128);
      values[3 * 128 + 7] = bad;
      std::vector<uint8_t> tile(codec.layout().bytes);
      try {
        codec.encode(keys.data(), values.data(), tile.data());
        FAIL() << name << " packed a non-finite value";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("value of token 3 channel 7"), std::string::npos) << e.what();
      }
    }
  }
}

TEST(TileCodec, RefusesUnsupportedShapes) {
  const auto kvarn = parse_cache_dtype("kvarn_k4v2_g128");
  for (int head_dim : {0, 4, 96, 1024}) {
    try {
      TileCodec(kvarn, head_dim, 128);
      FAIL() << head_dim;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::to_string(head_dim)), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("power of two from 8 to 512"), std::string::npos);
    }
  }
  EXPECT_THROW(TileCodec(kvarn, 128, 64), Error);  // g128 preset with 64-token blocks
  EXPECT_THROW(TileCodec(parse_cache_dtype("fp16"), 128, 100), Error);
  EXPECT_THROW(TileCodec(parse_cache_dtype("fp8"), 128, 128, 0.0f), Error);
}

}  // namespace
}  // namespace kvarn::codec
