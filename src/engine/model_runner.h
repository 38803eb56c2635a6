#pragma once
// Runs one engine step: the new tokens of each scheduled sequence through the model, their K/V into the cache,
// then every tail that became full flushed into a KVarN tile (DESIGN.md: "kv_cache.flush_full_tiles()").
#include "cache/kv_cache.h"
#include "model/llama.h"

#include <span>
#include <vector>

namespace kvarn::engine {

struct StepWork {
  int seq = 0;                         // cache sequence id
  std::span<const int32_t> tokens;     // at most cache.tail_room(seq) of them
  bool all_logits = false;             // logits of every row, not only the last (evaluation)
};

class ModelRunner {
public:
  ModelRunner(model::LlamaModel& model, cache::KvCache& cache, backend::Backend& backend)
      : model_(model), cache_(cache), backend_(backend) {}

  model::LlamaModel& model() { return model_; }
  cache::KvCache& cache() { return cache_; }

  // Returns, per work item, logits [rows][vocab] (all rows, or just the last).
  std::vector<std::vector<float>> execute(std::span<const StepWork> work);

private:
  model::LlamaModel& model_;
  cache::KvCache& cache_;
  backend::Backend& backend_;
};

}  // namespace kvarn::engine
