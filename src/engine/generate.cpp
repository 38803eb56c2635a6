#include "engine/generate.h"

#include "engine/stop_conditions.h"

#include "util/error.h"

#include <algorithm>
#include <chrono>

namespace kvarn::engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Frees the sequence's blocks and tail slot whatever happens.
struct SequenceGuard {
  cache::KvCache& cache;
  int seq;
  ~SequenceGuard() { cache.free_sequence(seq); }
};

}  // namespace

std::vector<float> prefill(Runtime& rt, int seq, std::span<const int32_t> ids, bool all_logits) {
  std::vector<float> logits;
  for (size_t pos = 0; pos < ids.size();) {
    const size_t n = std::min<size_t>(rt.cache().tail_room(seq), ids.size() - pos);
    const StepWork work{seq, ids.subspan(pos, n), all_logits};
    auto step = rt.runner().execute(std::span(&work, 1));
    logits.insert(logits.end(), step[0].begin(), step[0].end());
    pos += n;
  }
  if (!all_logits && !ids.empty()) logits.erase(logits.begin(), logits.end() - rt.config().vocab_size);
  return logits;
}

std::vector<int32_t> greedy_continuation(Runtime& rt, std::span<const int32_t> prompt, int count) {
  SequenceGuard guard{rt.cache(), rt.cache().add_sequence()};
  std::vector<float> logits = prefill(rt, guard.seq, prompt);
  std::vector<int32_t> out;
  for (;;) {
    out.push_back(static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    if (static_cast<int>(out.size()) >= count) return out;
    const StepWork work{guard.seq, std::span(&out.back(), 1), false};
    logits = rt.runner().execute(std::span(&work, 1))[0];
  }
}

GenerationResult generate(Runtime& rt, const tokenizer::Tokenizer& tokenizer, std::span<const int32_t> prompt,
                          const SamplingParams& params, const std::function<void(std::string_view)>& on_text) {
  Sampler sampler(params);
  if (prompt.empty()) throw Error("the prompt is empty; give at least one token");
  if (static_cast<int>(prompt.size()) >= rt.max_model_len())
    throw Error("the prompt has {} tokens; --max-model-len {} leaves no room to generate", prompt.size(),
                rt.max_model_len());
  SamplingParams bounded = params;  // the context limit ends a request like max_tokens
  bounded.max_tokens = std::min(params.max_tokens, rt.max_model_len() - static_cast<int>(prompt.size()));
  StopChecker stop(bounded, rt.config().eos_token_ids);

  GenerationResult result;
  SequenceGuard guard{rt.cache(), rt.cache().add_sequence()};
  const auto prefill_start = Clock::now();
  auto logits = prefill(rt, guard.seq, prompt);
  result.prefill_seconds = seconds_since(prefill_start);

  const auto decode_start = Clock::now();
  tokenizer::IncrementalDetokenizer detok(tokenizer, true);
  auto emit = [&](const std::string& text) {
    result.text += text;
    if (!text.empty()) on_text(text);
  };
  for (;;) {
    const int32_t token = sampler.sample(logits);
    const bool stop_token = stop.is_stop_token(token);
    if (!stop_token) result.output_ids.push_back(token);
    emit(stop.push(token, stop_token ? std::string() : detok.push(token)));
    if (stop.finished()) {
      // A stop string cuts the text: the detokenizer's pending bytes lie past the cut.
      if (stop_token || stop.finish_reason() == "length") emit(detok.finish());
      break;
    }
    const StepWork work{guard.seq, std::span(&result.output_ids.back(), 1), false};
    logits = rt.runner().execute(std::span(&work, 1))[0];
  }
  result.finish_reason = stop.finish_reason();
  result.decode_seconds = seconds_since(decode_start);
  result.kv_blocks_used = static_cast<int>(rt.cache().sequence(guard.seq).blocks.size());
  return result;
}

}  // namespace kvarn::engine
