// Cache dtype names: the vLLM aliases, the presets' bit widths and tile sizes, and a clear error for the rest.
#include "codec/cache_dtype.h"

#include "util/error.h"

#include <gtest/gtest.h>

namespace kvarn::codec {
namespace {

TEST(CacheDtype, ParsesPresetsAndAliases) {
  const auto k4v2 = parse_cache_dtype("kvarn_k4v2_g128");
  EXPECT_EQ(k4v2.method, Method::kvarn);
  EXPECT_EQ(k4v2.key_bits, 4);
  EXPECT_EQ(k4v2.value_bits, 2);
  EXPECT_EQ(k4v2.tile_tokens, 128);
  EXPECT_TRUE(k4v2.rotated() && k4v2.normalized() && k4v2.code_tile());
  EXPECT_EQ(parse_cache_dtype("kvarn_k4v4_g64").tile_tokens, 64);
  EXPECT_EQ(parse_cache_dtype("auto").name, "fp16");
  EXPECT_EQ(parse_cache_dtype("fp8").name, "fp8_e4m3");
  const auto rot = parse_cache_dtype("rot_k4v2_g128");
  EXPECT_TRUE(rot.rotated() && !rot.normalized());
  const auto rtn = parse_cache_dtype("rtn_k4v2_g128");
  EXPECT_TRUE(!rtn.rotated() && rtn.code_tile());
  EXPECT_EQ(cache_dtype_names().size(), 9u);
  EXPECT_EQ(parse_cache_dtype("fp32").tail_element_bytes(), 4);
}

TEST(CacheDtype, UnknownNameListsTheAllowedOnes) {
  try {
    parse_cache_dtype("kvarn_k3v2_g128");
    FAIL();
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("'kvarn_k3v2_g128'"), std::string::npos);
    EXPECT_NE(message.find("kvarn_k4v2_g128"), std::string::npos);
  }
}

}  // namespace
}  // namespace kvarn::codec
