#pragma once
// When a request stops, and which of its text may be shown so far, with vLLM's semantics: eos (unless ignore_eos)
// and stop_token_ids end it without their text, a stop string ends it and is cut from the text together with
// everything after it, max_tokens ends it as "length". Text that could still be the start of a stop string (which
// may span tokens) is held back until the next tokens decide; it is released when it turns out not to be one, or
// when the request ends. The context limit is the caller's: it passes max_tokens clamped to the room left.
#include "engine/sampler.h"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvarn::engine {

class StopChecker {
public:
  StopChecker(const SamplingParams& params, std::span<const int32_t> eos_token_ids);

  // Takes the next generated token and the text the detokenizer produced for it; returns the text that may be
  // emitted now. Once finished(), no more tokens may be pushed.
  std::string push(int32_t token, std::string_view piece);

  // eos (unless ignore_eos) or one of stop_token_ids: it ends the request and its text is not shown.
  bool is_stop_token(int32_t token) const;
  bool finished() const { return !finish_reason_.empty(); }
  // "stop" or "length", as OpenAI names them; empty while generating.
  const std::string& finish_reason() const { return finish_reason_; }

private:
  // Ends the request and releases all the text not yet emitted.
  std::string finish(const char* reason);

  std::vector<int32_t> stop_ids_;
  std::vector<std::string> stop_;
  int max_tokens_;
  int tokens_ = 0;
  std::string text_;    // the output text so far, held-back part included
  size_t emitted_ = 0;  // bytes of text_ already returned
  std::string finish_reason_;
};

}  // namespace kvarn::engine
