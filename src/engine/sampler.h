#pragma once
// Next-token sampling with vLLM's parameters and order: temperature, then top-k, top-p and min-p filters on the
// renormalized distribution, then a draw. Temperature 0 is greedy (lowest id on ties). One Sampler per request owns
// its random generator, so the same seed gives the same tokens.
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace kvarn::engine {

struct SamplingParams {
  float temperature = 1.0f;
  int top_k = -1;  // <= 0: off
  float top_p = 1.0f;
  float min_p = 0.0f;
  std::optional<uint64_t> seed = {};
  int max_tokens = 256;
  std::vector<std::string> stop = {};     // stop strings, not included in the output
  std::vector<int32_t> stop_token_ids = {};  // besides the model's eos ids
  bool ignore_eos = false;

  // Throws kvarn::Error naming the field and the allowed range.
  void validate() const;
};

class Sampler {
public:
  explicit Sampler(const SamplingParams& params);
  int32_t sample(std::span<const float> logits);

private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace kvarn::engine
