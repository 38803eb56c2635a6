#include "engine/stop_conditions.h"

#include "util/error.h"

#include <algorithm>

namespace kvarn::engine {

StopChecker::StopChecker(const SamplingParams& params, std::span<const int32_t> eos_token_ids)
    : stop_ids_(params.stop_token_ids), stop_(params.stop), max_tokens_(params.max_tokens) {
  params.validate();
  if (!params.ignore_eos) stop_ids_.insert(stop_ids_.end(), eos_token_ids.begin(), eos_token_ids.end());
}

bool StopChecker::is_stop_token(int32_t token) const {
  return std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end();
}

std::string StopChecker::push(int32_t token, std::string_view piece) {
  if (finished()) throw Error("StopChecker: token {} pushed after the request finished ({})", token, finish_reason_);
  ++tokens_;
  if (is_stop_token(token)) return finish("stop");

  // A new match must end inside the new piece; of several, the earliest one counts.
  const size_t old_size = text_.size();
  text_ += piece;
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, text_.find(s, old_size + 1 - std::min(old_size + 1, s.size())));
  if (cut != std::string::npos) {
    text_.resize(cut);
    return finish("stop");
  }
  if (tokens_ >= max_tokens_) return finish("length");

  // Hold back the longest tail of the text that is the beginning of a stop string.
  size_t held = 0;
  for (const auto& s : stop_)
    for (size_t n = std::min(s.size() - 1, text_.size()); n > held; --n)
      if (std::string_view(text_).ends_with(std::string_view(s).substr(0, n))) held = n;
  const size_t ready = text_.size() - held;
  std::string out = text_.substr(emitted_, ready - emitted_);
  emitted_ = ready;
  return out;
}

std::string StopChecker::finish(const char* reason) {
  finish_reason_ = reason;
  std::string out = text_.substr(emitted_);
  emitted_ = text_.size();
  return out;
}

}  // namespace kvarn::engine
