// Safetensors: the real single-file (F32) and sharded (BF16, with an index) models load with the right names and
// shapes; every malformed header is refused with an error naming the file and, where there is one, the tensor.
#include "model/safetensors.h"

#include "shared_dir.h"
#include "util/error.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>

namespace kvarn::model {
namespace {

std::vector<std::byte> image(const std::string& header, size_t data_bytes) {
  std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte{0});
  const uint64_t len = header.size();
  std::memcpy(out.data(), &len, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

TEST(Safetensors, LoadsTheRealModels) {
  const auto stories = TensorStore::open(test::shared_dir() / "models/stories260K");
  const auto q = stories.tensor("model.layers.0.self_attn.q_proj.weight", {64, 64});
  EXPECT_EQ(q.dtype, Dtype::f32);
  EXPECT_EQ(q.bytes, 64u * 64 * 4);
  const auto lm = TensorStore::open(test::shared_dir() / "models/kvarn-test-lm");  // 4 shards
  const auto k = lm.tensor("model.layers.7.self_attn.k_proj.weight", {256, 512});
  EXPECT_EQ(k.dtype, Dtype::bf16);
  for (float x : k.to_float()) ASSERT_TRUE(std::isfinite(x));
  EXPECT_THROW(lm.tensor("model.layers.7.self_attn.k_proj.weight", {512, 256}), Error);
  try {
    lm.tensor("model.layers.99.mlp.up_proj.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'model.layers.99.mlp.up_proj.weight'"), std::string::npos);
  }
  const auto capture = SafetensorsFile::open(test::shared_dir() / "golden/kvarn-test-lm/kv_capture.safetensors");
  EXPECT_EQ(capture.tensor("layer0.k").shape, (std::vector<int64_t>{2, 2048, 128}));
  EXPECT_EQ(capture.metadata().at("keys"), "post-RoPE");
}

TEST(Safetensors, MalformedHeadersAreRefused) {
  const std::pair<std::vector<std::byte>, std::string> cases[] = {
      {std::vector<std::byte>(4), "too short"},
      {[] {
         auto img = image("{}", 0);
         const uint64_t huge = 1000;
         std::memcpy(img.data(), &huge, 8);
         return img;
       }(),
       "runs past the end"},
      {image("{not json", 0), "invalid header JSON"},
      {image(R"({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8), "'t' has dtype I64"},
      {image(R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8), "fall outside"},
      {image(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", 16), "needs 12"},
      {image(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12), "overlap"},
      {image(R"({"t": {"dtype": "F32", "shape": [2]}})", 8), "'t' needs dtype"},
  };
  for (const auto& [bytes, expected] : cases) {
    try {
      parse_safetensors(bytes, "bad.safetensors");
      ADD_FAILURE() << "accepted a header expected to fail with: " << expected;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find("bad.safetensors"), 0u) << e.what();
    }
  }
}

TEST(Safetensors, MissingFilesAreNamed) {
  EXPECT_THROW(SafetensorsFile::open("/nonexistent.safetensors"), Error);
  EXPECT_THROW(TensorStore::open(test::shared_dir() / "data"), Error);  // no model.safetensors or index
}

}  // namespace
}  // namespace kvarn::model
