#include "engine/generate.h"

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
  std::vector<int32_t> stop_ids = params.stop_token_ids;
  if (!params.ignore_eos) stop_ids.insert(stop_ids.end(), rt.config().eos_token_ids.begin(), rt.config().eos_token_ids.end());
  size_t longest_stop = 0;
  for (const auto& s : params.stop) longest_stop = std::max(longest_stop, s.size());

  GenerationResult result;
  SequenceGuard guard{rt.cache(), rt.cache().add_sequence()};
  const auto prefill_start = Clock::now();
  auto logits = prefill(rt, guard.seq, prompt);
  result.prefill_seconds = seconds_since(prefill_start);

  const auto decode_start = Clock::now();
  tokenizer::IncrementalDetokenizer detok(tokenizer, true);
  size_t emitted = 0;  // bytes of result.text already passed to on_text
  auto release = [&](size_t upto) {
    if (upto > emitted) on_text(std::string_view(result.text).substr(emitted, upto - emitted));
    emitted = std::max(emitted, upto);
  };
  for (;;) {
    const int32_t token = sampler.sample(logits);
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
      result.finish_reason = "stop";
      break;
    }
    result.output_ids.push_back(token);
    result.text += detok.push(token);
    const auto hit = std::find_if(params.stop.begin(), params.stop.end(),
                                  [&](const std::string& s) { return result.text.find(s) != std::string::npos; });
    if (hit != params.stop.end()) {
      result.text.resize(result.text.find(*hit));
      result.finish_reason = "stop_string";
      break;
    }
    // Hold back what could still be the start of a stop string.
    release(result.text.size() - std::min(result.text.size(), longest_stop > 0 ? longest_stop - 1 : 0));
    const int total = static_cast<int>(prompt.size() + result.output_ids.size());
    if (static_cast<int>(result.output_ids.size()) >= params.max_tokens || total >= rt.max_model_len()) {
      result.finish_reason = "length";
      break;
    }
    const StepWork work{guard.seq, std::span(&result.output_ids.back(), 1), false};
    logits = rt.runner().execute(std::span(&work, 1))[0];
  }
  if (result.finish_reason == "stop_string") result.finish_reason = "stop";
  else result.text += detok.finish();
  release(result.text.size());
  result.decode_seconds = seconds_since(decode_start);
  result.kv_blocks_used = static_cast<int>(rt.cache().sequence(guard.seq).blocks.size());
  return result;
}

}  // namespace kvarn::engine
