// config.json parsing: the real models, each supported family's fields (qwen2 biases, qwen3 q/k norms, llama3 rope
// scaling, transformers 5's rope_parameters), and an error naming the file and field for every malformed input.
#include "model/config.h"

#include "shared_dir.h"
#include "util/error.h"

#include <gtest/gtest.h>

namespace kvarn::model {
namespace {

TEST(ModelConfig, ReadsTheRealModels) {
  const auto stories = load_config(test::shared_dir() / "models/stories260K");
  EXPECT_EQ(stories.head_dim, 8);
  EXPECT_EQ(stories.num_key_value_heads, 4);
  EXPECT_DOUBLE_EQ(stories.rope_theta, 10000.0);
  EXPECT_TRUE(stories.tie_word_embeddings);
  EXPECT_EQ(stories.bos_token_id, 1);
  EXPECT_EQ(stories.eos_token_ids, std::vector<int>{2});
  const auto lm = load_config(test::shared_dir() / "models/kvarn-test-lm");
  EXPECT_EQ(lm.head_dim, 128);
  EXPECT_EQ(lm.num_attention_heads, 4);
  EXPECT_EQ(lm.num_key_value_heads, 2);
  EXPECT_EQ(lm.max_position_embeddings, 2048);
  EXPECT_EQ(lm.eos_token_ids, std::vector<int>{0});
  EXPECT_EQ(lm.rope_scaling.type, RopeScaling::Type::none);
}

const char* kBase = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "vocab_size": 100)";

ModelConfig parse(const std::string& fields) { return parse_config("{" + fields + "}", "dir/config.json"); }

TEST(ModelConfig, FamilyFeatures) {
  const auto qwen2 = parse(std::string(R"("model_type": "qwen2", "num_key_value_heads": 2, )") + kBase);
  EXPECT_TRUE(qwen2.attention_bias);
  EXPECT_EQ(qwen2.head_dim, 16);
  const auto qwen3 = parse(std::string(R"("model_type": "qwen3", "head_dim": 32, "rope_theta": 1e6, )") + kBase);
  EXPECT_TRUE(qwen3.qk_norm);
  EXPECT_EQ(qwen3.head_dim, 32);
  EXPECT_DOUBLE_EQ(qwen3.rope_theta, 1e6);
  const auto llama3 = parse(std::string(R"("model_type": "llama", "eos_token_id": [1, 2], "rope_scaling": {"rope_type":
      "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, )") + kBase);
  EXPECT_EQ(llama3.rope_scaling.type, RopeScaling::Type::llama3);
  EXPECT_EQ(llama3.eos_token_ids, (std::vector<int>{1, 2}));
  const auto tf5 = parse(std::string(R"("model_type": "mistral", "rope_parameters": {"rope_theta": 5e5,
      "rope_type": "linear", "factor": 2.0}, )") + kBase);
  EXPECT_DOUBLE_EQ(tf5.rope_theta, 5e5);
  EXPECT_EQ(tf5.rope_scaling.type, RopeScaling::Type::linear);
}

TEST(ModelConfig, ErrorsNameTheFileAndField) {
  const std::pair<std::string, std::string> cases[] = {
      {std::string(R"("model_type": "gpt2", )") + kBase, "model_type 'gpt2' is not supported"},
      {R"("model_type": "llama", "hidden_size": 64)", "missing field 'intermediate_size'"},
      {std::string(R"("model_type": "llama", "num_key_value_heads": 3, )") + kBase,
       "num_attention_heads 4 is not a multiple of num_key_value_heads 3"},
      {std::string(R"("model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4}, )") + kBase,
       "rope type 'yarn' is not supported"},
      {R"("model_type": "llama", "hidden_size": "64", "intermediate_size": 1)", "field 'hidden_size' is \"64\""},
      {R"("model_type": "llama", "hidden_size": -8, "intermediate_size": 1)", "field 'hidden_size' is -8"},
  };
  for (const auto& [fields, expected] : cases) {
    try {
      parse(fields);
      ADD_FAILURE() << "accepted: " << fields;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("dir/config.json"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(parse_config("{not json", "dir/config.json"), Error);
  EXPECT_THROW(load_config("/nonexistent"), Error);
  EXPECT_THROW(shape_preset("llama-9"), Error);
}

}  // namespace
}  // namespace kvarn::model
