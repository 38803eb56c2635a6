#pragma once
// The Llama-family forward pass (Llama 2/3, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k RMSNorm), written once
// against backend::Backend. One call runs one step: the new rows of every scheduled sequence, which are appended to
// the KV cache on the way through.
#include "backend/backend.h"
#include "model/config.h"
#include "model/rope.h"
#include "model/weights.h"

#include <vector>

namespace kvarn::model {

struct ForwardBatch {
  std::vector<int32_t> tokens;                // one per row
  std::vector<int32_t> positions;             // one per row
  std::vector<backend::StepSequence> seqs;    // rows grouped by sequence
  std::vector<int32_t> logit_rows;            // rows whose next-token logits are wanted
};

class LlamaModel {
public:
  LlamaModel(ModelConfig config, ModelWeights weights, backend::Backend& backend);

  const ModelConfig& config() const { return config_; }
  // Returns logits [batch.logit_rows.size()][vocab_size].
  std::vector<float> forward(const ForwardBatch& batch);

private:
  void attention_block(int layer, const ForwardBatch& batch, int rows);
  void mlp_block(int layer, int rows);
  void reserve_rows(int rows);

  ModelConfig config_;
  ModelWeights weights_;
  backend::Backend& backend_;
  Rope rope_;

  // Activations, sized for the largest step seen so far.
  int capacity_ = 0;
  std::vector<std::shared_ptr<float>> storage_;
  backend::Tensor x_, h_, q_, k_, v_, attn_, gate_, up_, cos_sin_;
};

}  // namespace kvarn::model
