#pragma once
// The weights of a Llama-family model, in the backend's memory, named as the forward pass uses them.
#include "backend/backend.h"
#include "model/config.h"

#include <filesystem>
#include <vector>

namespace kvarn::model {

struct LayerWeights {
  backend::Weight attn_norm, q, k, v, o;
  backend::Weight q_bias, k_bias, v_bias;  // qwen2
  backend::Weight q_norm, k_norm;          // qwen3
  backend::Weight mlp_norm, gate, up, down;
};

struct ModelWeights {
  backend::Weight embed, final_norm, lm_head;
  std::vector<LayerWeights> layers;
};

// Reads every tensor the config calls for from the model folder's safetensors, checking its shape.
ModelWeights load_weights(const std::filesystem::path& model_dir, const ModelConfig& config,
                          backend::Backend& backend);

}  // namespace kvarn::model
