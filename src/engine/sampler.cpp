#include "engine/sampler.h"

#include "util/error.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvarn::engine {

void SamplingParams::validate() const {
  if (!(temperature >= 0) || !std::isfinite(temperature))
    throw Error("temperature {}: expected a finite number >= 0 (0 is greedy)", temperature);
  if (top_k == 0 || top_k < -1) throw Error("top_k {}: expected -1 (off) or at least 1", top_k);
  if (!(top_p > 0 && top_p <= 1)) throw Error("top_p {}: expected a number in (0, 1]", top_p);
  if (!(min_p >= 0 && min_p <= 1)) throw Error("min_p {}: expected a number in [0, 1]", min_p);
  if (max_tokens < 1) throw Error("max_tokens {}: expected at least 1", max_tokens);
  for (const auto& s : stop)
    if (s.empty()) throw Error("stop: stop strings must not be empty");
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed ? *params.seed : std::random_device{}()) {
  params_.validate();
}

int32_t Sampler::sample(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (params_.temperature < 1e-5f)
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());

  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; };
  size_t keep = ids.size();
  if (params_.top_k > 0 && params_.top_k < vocab) {
    keep = static_cast<size_t>(params_.top_k);
    std::nth_element(ids.begin(), ids.begin() + keep - 1, ids.end(), by_logit);
  }
  ids.resize(keep);
  std::sort(ids.begin(), ids.end(), by_logit);

  std::vector<double> p(keep);
  const double max = logits[ids[0]];
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((logits[ids[i]] - max) / params_.temperature));
  for (double& x : p) x /= sum;
  if (params_.top_p < 1) {  // smallest prefix whose mass reaches top_p
    double mass = 0;
    size_t n = 0;
    while (n < keep && mass < params_.top_p) mass += p[n++];
    keep = std::max<size_t>(n, 1);
  }
  if (params_.min_p > 0) {
    size_t n = 0;
    while (n < keep && p[n] >= params_.min_p * p[0]) ++n;
    keep = std::max<size_t>(n, 1);
  }
  const double total = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  double draw = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (size_t i = 0; i < keep; ++i)
    if ((draw -= p[i]) < 0) return ids[i];
  return ids[keep - 1];
}

}  // namespace kvarn::engine
