#include "engine/runtime.h"

#include "backend/cpu/cpu_backend.h"
#include "model/weights.h"
#include "util/error.h"

namespace kvarn::engine {

Runtime::Runtime(const std::filesystem::path& model_dir, const RuntimeOptions& options) {
  model::ModelConfig config = model::load_config(model_dir);
  max_model_len_ = options.max_model_len > 0 ? options.max_model_len : config.max_position_embeddings;
  if (max_model_len_ > config.max_position_embeddings)
    throw Error("--max-model-len {} exceeds the model's max_position_embeddings {}", max_model_len_,
                config.max_position_embeddings);
  if (options.max_num_seqs < 1) throw Error("--max-num-seqs {}: expected at least 1", options.max_num_seqs);

  backend_ = std::make_unique<backend::CpuBackend>(options.threads);
  auto weights = model::load_weights(model_dir, config, *backend_);

  cache::KvCacheShape shape;
  shape.dtype = codec::parse_cache_dtype(options.kv_cache_dtype);
  shape.num_layers = config.num_hidden_layers;
  shape.num_kv_heads = config.num_key_value_heads;
  shape.head_dim = config.head_dim;
  shape.block_size = codec::resolve_block_size(shape.dtype, options.block_size);
  shape.max_seqs = options.max_num_seqs;
  const int blocks_per_seq = (max_model_len_ + shape.block_size - 1) / shape.block_size;
  shape.num_blocks = options.kv_cache_bytes > 0 ? cache::KvCacheShape::blocks_for_budget(shape, options.kv_cache_bytes)
                                                : blocks_per_seq * options.max_num_seqs;
  cache_ = std::make_unique<cache::KvCache>(shape);
  backend_->allocate_kv_cache(shape);
  model_ = std::make_unique<model::LlamaModel>(std::move(config), std::move(weights), *backend_);
  runner_ = std::make_unique<ModelRunner>(*model_, *cache_, *backend_);
}

}  // namespace kvarn::engine
