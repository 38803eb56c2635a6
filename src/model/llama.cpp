#include "model/llama.h"

#include <cmath>

namespace kvarn::model {

namespace {
const backend::Weight kNoBias{};
}

LlamaModel::LlamaModel(ModelConfig config, ModelWeights weights, backend::Backend& backend)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      backend_(backend),
      rope_(config_.head_dim, config_.rope_theta, config_.rope_scaling) {}

void LlamaModel::reserve_rows(int rows) {
  if (rows <= capacity_) return;
  capacity_ = rows;
  storage_.clear();
  auto tensor = [&](int cols) {
    storage_.push_back(backend_.allocate(static_cast<size_t>(rows) * cols));
    return backend::Tensor{storage_.back().get(), rows, cols};
  };
  const auto& c = config_;
  x_ = tensor(c.hidden_size);
  h_ = tensor(c.hidden_size);
  q_ = tensor(c.num_attention_heads * c.head_dim);
  k_ = tensor(c.num_key_value_heads * c.head_dim);
  v_ = tensor(c.num_key_value_heads * c.head_dim);
  attn_ = tensor(c.num_attention_heads * c.head_dim);
  gate_ = tensor(c.intermediate_size);
  up_ = tensor(c.intermediate_size);
  cos_sin_ = tensor(c.head_dim);
}

std::vector<float> LlamaModel::forward(const ForwardBatch& batch) {
  const int rows = static_cast<int>(batch.tokens.size());
  reserve_rows(rows);
  std::vector<float> cos_sin(static_cast<size_t>(rows) * config_.head_dim);
  rope_.cos_sin(batch.positions, cos_sin.data());
  backend_.upload(cos_sin.data(), cos_sin_.first_rows(rows));

  backend_.embed(weights_.embed, batch.tokens, x_.first_rows(rows));
  for (int layer = 0; layer < config_.num_hidden_layers; ++layer) {
    attention_block(layer, batch, rows);
    mlp_block(layer, rows);
  }

  // Only the wanted rows go through the final norm and the LM head.
  const int wanted = static_cast<int>(batch.logit_rows.size());
  std::vector<float> logits(static_cast<size_t>(wanted) * config_.vocab_size);
  for (int begin = 0; begin < wanted; begin += capacity_) {
    const int n = std::min(capacity_, wanted - begin);
    for (int i = 0; i < n; ++i)
      backend_.rmsnorm({x_.row(batch.logit_rows[begin + i]), 1, x_.cols}, weights_.final_norm, config_.rms_norm_eps,
                       {h_.row(i), 1, h_.cols});
    auto out = backend_.allocate(static_cast<size_t>(n) * config_.vocab_size);
    const backend::Tensor logits_t{out.get(), n, config_.vocab_size};
    backend_.matmul(h_.first_rows(n), weights_.lm_head, kNoBias, logits_t);
    backend_.download(logits_t, logits.data() + static_cast<size_t>(begin) * config_.vocab_size);
  }
  return logits;
}

void LlamaModel::attention_block(int layer, const ForwardBatch& batch, int rows) {
  const LayerWeights& w = weights_.layers[layer];
  const int d = config_.head_dim, q_heads = config_.num_attention_heads, kv_heads = config_.num_key_value_heads;
  const auto x = x_.first_rows(rows), h = h_.first_rows(rows), q = q_.first_rows(rows), k = k_.first_rows(rows),
             v = v_.first_rows(rows), attn = attn_.first_rows(rows), cos_sin = cos_sin_.first_rows(rows);

  backend_.rmsnorm(x, w.attn_norm, config_.rms_norm_eps, h);
  backend_.matmul(h, w.q, w.q_bias, q);
  backend_.matmul(h, w.k, w.k_bias, k);
  backend_.matmul(h, w.v, w.v_bias, v);
  if (w.q_norm.data) {  // qwen3: RMSNorm of each head before RoPE
    backend_.rmsnorm({q.data, rows * q_heads, d}, w.q_norm, config_.rms_norm_eps, {q.data, rows * q_heads, d});
    backend_.rmsnorm({k.data, rows * kv_heads, d}, w.k_norm, config_.rms_norm_eps, {k.data, rows * kv_heads, d});
  }
  backend_.rope(q, q_heads, cos_sin);
  backend_.rope(k, kv_heads, cos_sin);
  backend_.kv_append(layer, batch.seqs, k, v);
  backend_.attention(layer, batch.seqs, q, q_heads, 1.0f / std::sqrt(static_cast<float>(d)), attn);
  backend_.matmul(attn, w.o, kNoBias, h);
  backend_.add(x, h);
}

void LlamaModel::mlp_block(int layer, int rows) {
  const LayerWeights& w = weights_.layers[layer];
  const auto x = x_.first_rows(rows), h = h_.first_rows(rows), gate = gate_.first_rows(rows),
             up = up_.first_rows(rows);
  backend_.rmsnorm(x, w.mlp_norm, config_.rms_norm_eps, h);
  backend_.matmul(h, w.gate, kNoBias, gate);
  backend_.matmul(h, w.up, kNoBias, up);
  backend_.swiglu(gate, up, gate);
  backend_.matmul(gate, w.down, kNoBias, h);
  backend_.add(x, h);
}

}  // namespace kvarn::model
