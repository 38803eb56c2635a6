#pragma once
// The assembled engine for one model folder: backend, weights, forward pass, paged KV cache and model runner,
// sized from the vLLM-style options. What the CLI commands, the evaluator and the end-to-end tests start from.
#include "backend/backend.h"
#include "cache/kv_cache.h"
#include "engine/model_runner.h"
#include "model/config.h"
#include "model/llama.h"

#include <filesystem>
#include <memory>
#include <string>

namespace kvarn::engine {

struct RuntimeOptions {
  std::string kv_cache_dtype = "auto";
  int block_size = 0;       // 0: the dtype's tile size, or 128
  int threads = 0;          // 0: all hardware threads
  int max_num_seqs = 1;
  int max_model_len = 0;    // 0: the model's max_position_embeddings
  size_t kv_cache_bytes = 0;  // 0: room for max_num_seqs sequences of max_model_len tokens
};

class Runtime {
public:
  Runtime(const std::filesystem::path& model_dir, const RuntimeOptions& options);

  const model::ModelConfig& config() const { return model_->config(); }
  int max_model_len() const { return max_model_len_; }
  backend::Backend& backend() { return *backend_; }
  cache::KvCache& cache() { return *cache_; }
  ModelRunner& runner() { return *runner_; }

private:
  std::unique_ptr<backend::Backend> backend_;
  std::unique_ptr<model::LlamaModel> model_;
  std::unique_ptr<cache::KvCache> cache_;
  std::unique_ptr<ModelRunner> runner_;
  int max_model_len_ = 0;
};

}  // namespace kvarn::engine
