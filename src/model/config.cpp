#include "model/config.h"

#include "util/error.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

namespace kvarn::model {

namespace {

using nlohmann::json;

struct Reader {
  const json& root;
  const std::string& source;

  template <typename T>
  T required(const json& obj, const char* field, const char* expected) const {
    if (!obj.contains(field)) throw Error("{}: missing field '{}' ({})", source, field, expected);
    return get<T>(obj, field, expected);
  }
  template <typename T>
  T optional(const json& obj, const char* field, T fallback, const char* expected) const {
    if (!obj.contains(field) || obj[field].is_null()) return fallback;
    return get<T>(obj, field, expected);
  }
  template <typename T>
  T get(const json& obj, const char* field, const char* expected) const {
    const json& v = obj[field];
    if constexpr (std::is_same_v<T, bool>) {
      if (v.is_boolean()) return v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      if (v.is_number_integer()) return v.get<T>();
    } else if constexpr (std::is_floating_point_v<T>) {
      if (v.is_number()) return v.get<T>();
    } else {
      if (v.is_string()) return v.get<T>();
    }
    throw Error("{}: field '{}' is {}; expected {}", source, field, v.dump(), expected);
  }
  int positive(const json& obj, const char* field) const {
    const int value = required<int>(obj, field, "a positive integer");
    if (value <= 0) throw Error("{}: field '{}' is {}; expected a positive integer", source, field, value);
    return value;
  }
};

std::vector<int> token_ids(const json& v, const std::string& source, const char* field) {
  if (v.is_null()) return {};
  if (v.is_number_integer()) return {v.get<int>()};
  if (v.is_array()) {
    std::vector<int> ids;
    for (const auto& x : v) {
      if (!x.is_number_integer()) throw Error("{}: field '{}' holds {}; expected token ids", source, field, x.dump());
      ids.push_back(x.get<int>());
    }
    return ids;
  }
  throw Error("{}: field '{}' is {}; expected a token id or a list of them", source, field, v.dump());
}

RopeScaling parse_rope_scaling(const json& root, const Reader& r) {
  // transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_scaling.
  const json* params = nullptr;
  if (root.contains("rope_scaling") && root["rope_scaling"].is_object()) params = &root["rope_scaling"];
  if (root.contains("rope_parameters") && root["rope_parameters"].is_object()) params = &root["rope_parameters"];
  RopeScaling s;
  if (!params) return s;
  std::string type = r.optional<std::string>(*params, "rope_type", "", "a string");
  if (type.empty()) type = r.optional<std::string>(*params, "type", "default", "a string");
  if (type == "default") return s;
  if (type == "linear") {
    s.type = RopeScaling::Type::linear;
    s.factor = r.required<float>(*params, "factor", "a number");
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::llama3;
    s.factor = r.required<float>(*params, "factor", "a number");
    s.low_freq_factor = r.required<float>(*params, "low_freq_factor", "a number");
    s.high_freq_factor = r.required<float>(*params, "high_freq_factor", "a number");
    s.original_max_position = r.required<int>(*params, "original_max_position_embeddings", "an integer");
  } else {
    throw Error("{}: rope type '{}' is not supported; expected default, linear or llama3", r.source, type);
  }
  if (!(s.factor > 0)) throw Error("{}: rope factor {} must be positive", r.source, s.factor);
  return s;
}

}  // namespace

ModelConfig parse_config(const std::string& text, const std::string& source) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    throw Error("{}: invalid JSON: {}", source, e.what());
  }
  if (!root.is_object()) throw Error("{}: expected a JSON object", source);
  const Reader r{root, source};
  ModelConfig c;
  c.model_type = r.required<std::string>(root, "model_type", "a string");
  static const std::vector<std::string> supported = {"llama", "mistral", "qwen2", "qwen3"};
  if (std::find(supported.begin(), supported.end(), c.model_type) == supported.end())
    throw Error("{}: model_type '{}' is not supported; expected one of {}", source, c.model_type,
                fmt::join(supported, ", "));
  c.hidden_size = r.positive(root, "hidden_size");
  c.intermediate_size = r.positive(root, "intermediate_size");
  c.num_hidden_layers = r.positive(root, "num_hidden_layers");
  c.num_attention_heads = r.positive(root, "num_attention_heads");
  c.num_key_value_heads = root.contains("num_key_value_heads") ? r.positive(root, "num_key_value_heads")
                                                                : c.num_attention_heads;
  c.vocab_size = r.positive(root, "vocab_size");
  c.max_position_embeddings = r.optional<int>(root, "max_position_embeddings", 2048, "an integer");
  c.head_dim = root.contains("head_dim") && !root["head_dim"].is_null() ? r.positive(root, "head_dim")
                                                                         : c.hidden_size / c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw Error("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source,
                c.num_attention_heads, c.num_key_value_heads);
  if (c.head_dim % 2 != 0) throw Error("{}: head_dim {} must be even for rotary embeddings", source, c.head_dim);
  c.rms_norm_eps = r.optional<float>(root, "rms_norm_eps", 1e-6f, "a number");
  c.rope_theta = r.optional<double>(root, "rope_theta", 10000.0, "a number");
  if (root.contains("rope_parameters") && root["rope_parameters"].is_object())
    c.rope_theta = r.optional<double>(root["rope_parameters"], "rope_theta", c.rope_theta, "a number");
  c.rope_scaling = parse_rope_scaling(root, r);
  c.tie_word_embeddings = r.optional<bool>(root, "tie_word_embeddings", false, "true or false");
  c.attention_bias = c.model_type == "qwen2" || r.optional<bool>(root, "attention_bias", false, "true or false");
  c.qk_norm = c.model_type == "qwen3";
  const auto bos = token_ids(root.value("bos_token_id", json()), source, "bos_token_id");
  if (!bos.empty()) c.bos_token_id = bos.front();
  c.eos_token_ids = token_ids(root.value("eos_token_id", json()), source, "eos_token_id");
  return c;
}

ModelConfig load_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  std::ifstream in(path);
  if (!in) throw Error("{}: cannot open (is '{}' a Hugging Face model folder?)", path.string(), model_dir.string());
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path.string());
}

namespace {
ModelConfig shape(const char* type, int hidden, int ffn, int layers, int heads, int kv_heads, int head_dim,
                  int vocab, int max_pos, double theta, bool tied) {
  ModelConfig c;
  c.model_type = type;
  c.hidden_size = hidden;
  c.intermediate_size = ffn;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.max_position_embeddings = max_pos;
  c.rope_theta = theta;
  c.tie_word_embeddings = tied;
  c.qk_norm = c.model_type == "qwen3";
  return c;
}
}  // namespace

ModelConfig shape_preset(const std::string& name) {
  if (name == "llama-3-8b") return shape("llama", 4096, 14336, 32, 32, 8, 128, 128256, 131072, 500000.0, false);
  if (name == "llama-3.2-1b") return shape("llama", 2048, 8192, 16, 32, 8, 64, 128256, 131072, 500000.0, true);
  if (name == "qwen3-8b") return shape("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 40960, 1000000.0, false);
  if (name == "qwen3-32b") return shape("qwen3", 5120, 25600, 64, 64, 8, 128, 151936, 40960, 1000000.0, false);
  throw Error("--shape '{}' is not known; expected one of {}", name, fmt::join(shape_preset_names(), ", "));
}

const std::vector<std::string>& shape_preset_names() {
  static const std::vector<std::string> names = {"llama-3-8b", "qwen3-8b", "qwen3-32b", "llama-3.2-1b"};
  return names;
}

}  // namespace kvarn::model
