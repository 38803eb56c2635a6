#pragma once
// One request from prompt ids to finished text: tile-aligned prefill chunks, then decode steps that sample, stream
// text (UTF-8 safe, stop strings held back until decided) and stop at eos, a stop token or string, max_tokens or the
// context limit. The sequence's KV blocks go back to the pool however it ends.
#include "engine/runtime.h"
#include "engine/sampler.h"
#include "tokenizer/tokenizer.h"

#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace kvarn::engine {

struct GenerationResult {
  std::vector<int32_t> output_ids;
  std::string text;
  std::string finish_reason;  // "stop" or "length", as OpenAI names them
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int kv_blocks_used = 0;  // at the end, before release
};

GenerationResult generate(Runtime& runtime, const tokenizer::Tokenizer& tokenizer, std::span<const int32_t> prompt,
                          const SamplingParams& params, const std::function<void(std::string_view)>& on_text);

// Feeds ids to a sequence in tile-aligned chunks; returns the logits of the last id (all_logits: of every id).
std::vector<float> prefill(Runtime& runtime, int seq, std::span<const int32_t> ids, bool all_logits = false);

// The `count` greedy tokens after `prompt` (argmax, no stop conditions), in a sequence of its own.
std::vector<int32_t> greedy_continuation(Runtime& runtime, std::span<const int32_t> prompt, int count);

}  // namespace kvarn::engine
