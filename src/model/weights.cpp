#include "model/weights.h"

#include "model/safetensors.h"

#include <fmt/format.h>

namespace kvarn::model {

namespace {

struct Loader {
  const TensorStore& store;
  backend::Backend& backend;

  backend::Weight matrix(const std::string& name, int rows, int cols) const {
    return backend.upload_weight(store.tensor(name, {rows, cols}).to_float(), rows, cols);
  }
  backend::Weight vector(const std::string& name, int size) const {
    return backend.upload_weight(store.tensor(name, {size}).to_float(), 1, size);
  }
};

}  // namespace

ModelWeights load_weights(const std::filesystem::path& model_dir, const ModelConfig& c, backend::Backend& backend) {
  const TensorStore store = TensorStore::open(model_dir);
  const Loader load{store, backend};
  const int hidden = c.hidden_size, d = c.head_dim, q_dim = c.num_attention_heads * d,
            kv_dim = c.num_key_value_heads * d, ffn = c.intermediate_size;

  ModelWeights w;
  w.embed = load.matrix("model.embed_tokens.weight", c.vocab_size, hidden);
  w.final_norm = load.vector("model.norm.weight", hidden);
  w.lm_head = c.tie_word_embeddings ? w.embed : load.matrix("lm_head.weight", c.vocab_size, hidden);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    LayerWeights l;
    l.attn_norm = load.vector(p + "input_layernorm.weight", hidden);
    l.q = load.matrix(p + "self_attn.q_proj.weight", q_dim, hidden);
    l.k = load.matrix(p + "self_attn.k_proj.weight", kv_dim, hidden);
    l.v = load.matrix(p + "self_attn.v_proj.weight", kv_dim, hidden);
    l.o = load.matrix(p + "self_attn.o_proj.weight", hidden, q_dim);
    if (c.attention_bias) {
      l.q_bias = load.vector(p + "self_attn.q_proj.bias", q_dim);
      l.k_bias = load.vector(p + "self_attn.k_proj.bias", kv_dim);
      l.v_bias = load.vector(p + "self_attn.v_proj.bias", kv_dim);
    }
    if (c.qk_norm) {
      l.q_norm = load.vector(p + "self_attn.q_norm.weight", d);
      l.k_norm = load.vector(p + "self_attn.k_norm.weight", d);
    }
    l.mlp_norm = load.vector(p + "post_attention_layernorm.weight", hidden);
    l.gate = load.matrix(p + "mlp.gate_proj.weight", ffn, hidden);
    l.up = load.matrix(p + "mlp.up_proj.weight", ffn, hidden);
    l.down = load.matrix(p + "mlp.down_proj.weight", hidden, ffn);
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace kvarn::model
