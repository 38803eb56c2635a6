#pragma once
// Next-token sampling with vLLM's parameters and order: temperature, then the top-k, top-p and min-p filters, then a
// draw from the renormalized distribution. Temperature 0 is greedy (lowest id on ties). One Sampler per request owns
// its random generator, so the same seed gives the same tokens.
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace kvarn::engine {

struct SamplingParams {
  float temperature = 1.0f;  // 0 (or below 1e-5): greedy
  int top_k = -1;            // -1: off
  float top_p = 1.0f;
  float min_p = 0.0f;
  std::optional<uint64_t> seed = {};  // absent: a fresh random seed per request
  int max_tokens = 256;
  std::vector<int32_t> stop_token_ids = {};  // besides the model's eos ids
  std::vector<std::string> stop = {};        // stop strings, not included in the output
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
  // Scratch reused across steps, as one request samples hundreds of times from the same vocabulary.
  std::vector<int32_t> ids_;
  std::vector<float> weights_;  // by token id; set for the candidates only
};

}  // namespace kvarn::engine
