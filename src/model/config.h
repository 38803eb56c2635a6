#pragma once
// A Hugging Face config.json of the Llama family (llama, mistral, qwen2, qwen3), as the forward pass needs it.
#include "model/rope.h"

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace kvarn::model {

struct ModelConfig {
  std::string model_type;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry biases (qwen2)
  bool qk_norm = false;         // RMSNorm of each q and k head before RoPE (qwen3)
  std::optional<int> bos_token_id;
  std::vector<int> eos_token_ids;
};

// Reads model_dir/config.json. Errors name the file, the field and what was expected.
ModelConfig load_config(const std::filesystem::path& model_dir);
ModelConfig parse_config(const std::string& json_text, const std::string& source_name);

// Published shapes of well-known models, for capacity planning and benchmarks without weights.
ModelConfig shape_preset(const std::string& name);
const std::vector<std::string>& shape_preset_names();

}  // namespace kvarn::model
