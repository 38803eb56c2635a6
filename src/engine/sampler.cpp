#include "engine/sampler.h"

#include "util/error.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <tuple>
#include <utility>

namespace kvarn::engine {

namespace {

// e^x for x <= 0, within 1e-7 relative, and 0 below about -87.7 where floats leave their normal range. Unlike
// std::exp it vectorizes (this file is built with -fno-trapping-math for that): the weights of a 150K vocabulary
// take tens of microseconds instead of half a millisecond. Cephes' expf: e^x = 2^n e^r with |r| <= ln 2 / 2.
float exp_nonpositive(float x) {
  const float c = std::max(x, -88.0f);  // -inf included; n = -127 there: an exponent field of 0 makes 0
  const float n = std::floor(c * 1.44269504f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, so that r stays exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// Reductions in independent lanes, so that they vectorize (a single running max or sum cannot be reordered).
constexpr size_t kLanes = 16;

float max_of(std::span<const float> values) {
  std::array<float, kLanes> lanes;
  lanes.fill(-INFINITY);
  size_t i = 0;
  for (; i + kLanes <= values.size(); i += kLanes)
    for (size_t j = 0; j < kLanes; ++j) lanes[j] = std::max(lanes[j], values[i + j]);
  for (; i < values.size(); ++i) lanes[0] = std::max(lanes[0], values[i]);
  return *std::max_element(lanes.begin(), lanes.end());
}

double sum_of(std::span<const float> values) {
  std::array<double, kLanes> lanes{};
  size_t i = 0;
  for (; i + kLanes <= values.size(); i += kLanes)
    for (size_t j = 0; j < kLanes; ++j) lanes[j] += values[i + j];
  for (; i < values.size(); ++i) lanes[0] += values[i];
  double total = 0;
  for (double x : lanes) total += x;
  return total;
}

size_t count_above(std::span<const float> logits, float cut) {
  size_t n = 0;
  for (float x : logits) n += x >= cut;
  return n;
}

// How many tokens reach a cut with their logit, and their weight.
struct Above {
  size_t count = 0;
  double mass = 0;
};

Above above(std::span<const float> logits, std::span<const float> weights, float cut) {
  // Each weight is multiplied by its test's 0 or 1: GCC 12 at -O3 miscompiles the same sum written with ?: into
  // lanes, and the plain conditional sum does not vectorize.
  std::array<double, kLanes> lanes{};
  size_t i = 0;
  for (; i + kLanes <= logits.size(); i += kLanes)
    for (size_t j = 0; j < kLanes; ++j) lanes[j] += weights[i + j] * static_cast<float>(logits[i + j] >= cut);
  for (; i < logits.size(); ++i) lanes[0] += weights[i] * static_cast<float>(logits[i] >= cut);
  double mass = 0;
  for (double x : lanes) mass += x;
  return {count_above(logits, cut), mass};
}

// The highest cut (to 2^-20 of [lo, hi]) that at least k logits reach, or lo if fewer than k do there. Each try is
// one vectorized count, far cheaper than selecting among all the ids; the search stops once at most 2k reach it.
float top_k_cut(std::span<const float> logits, float lo, float hi, size_t k) {
  if (count_above(logits, lo) <= k) return lo;
  for (int i = 0; i < 20; ++i) {
    const float mid = lo + (hi - lo) / 2;
    const size_t n = count_above(logits, mid);
    if (n < k) {
      hi = mid;
      continue;
    }
    lo = mid;
    if (n <= 2 * k) break;
  }
  return lo;
}

// Moves the tokens that top-p keeps to the front of ids and returns their number: the best tokens while the mass
// before them is below target. A quickselect on mass: nothing is sorted, and the time is linear in ids.size().
template <typename Before>
size_t top_p_count(std::span<int32_t> ids, std::span<const float> weights, double target, const Before& before) {
  // ids[0, lo) are the best lo tokens, with mass below target; the count sought is in (lo, hi].
  size_t lo = 0, hi = ids.size();
  double lo_mass = 0;
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(ids.begin() + lo, ids.begin() + mid, ids.begin() + hi, before);
    double mid_mass = lo_mass;
    for (size_t i = lo; i < mid; ++i) mid_mass += weights[ids[i]];
    if (mid_mass < target) {
      lo = mid;
      lo_mass = mid_mass;
    } else {
      hi = mid;
    }
  }
  return hi;
}

// Draws token i with probability weights[i] / their sum, without gathering candidates: whole blocks are skipped
// by their (vectorized) sums, and only the block holding the draw is scanned token by token.
int32_t draw_any(std::span<const float> weights, std::mt19937_64& rng) {
  constexpr size_t kBlock = 1024;
  double draw = std::uniform_real_distribution<double>(0.0, sum_of(weights))(rng);
  size_t i = 0;
  for (; i + kBlock < weights.size(); i += kBlock) {
    const double block = sum_of(weights.subspan(i, kBlock));
    if (draw < block) break;
    draw -= block;
  }
  for (; i < weights.size(); ++i)
    if (weights[i] > 0 && (draw -= weights[i]) < 0) return static_cast<int32_t>(i);
  // Rounding left a sliver of the draw past the end: the last token that can be drawn.
  while (weights[--i] == 0) {}
  return static_cast<int32_t>(i);
}

}  // namespace

void SamplingParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0)
    throw Error("temperature: expected a finite number >= 0 (0 is greedy), got {}", temperature);
  if (top_k != -1 && top_k < 1) throw Error("top_k: expected -1 (off) or an integer >= 1, got {}", top_k);
  if (!(top_p > 0 && top_p <= 1)) throw Error("top_p: expected a number in (0, 1], got {}", top_p);
  if (!(min_p >= 0 && min_p <= 1)) throw Error("min_p: expected a number in [0, 1], got {}", min_p);
  if (max_tokens < 1) throw Error("max_tokens: expected an integer >= 1, got {}", max_tokens);
  for (size_t i = 0; i < stop.size(); ++i)
    if (stop[i].empty()) throw Error("stop[{}]: expected a non-empty string", i);
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed ? *params.seed : std::random_device{}()) {
  params_.validate();
}

int32_t Sampler::sample(std::span<const float> logits) {
  const float best = max_of(logits);
  if (!std::isfinite(best))
    throw Error("logits: expected a finite largest value, got {} among {} values", best, logits.size());
  if (params_.temperature < 1e-5f)  // the first maximum: the lowest id on ties
    return static_cast<int32_t>(std::find(logits.begin(), logits.end(), best) - logits.begin());

  // Softmax weights relative to the best token's (which is 1), left unnormalized: the draw renormalizes over
  // whatever the filters keep.
  const size_t vocab = logits.size();
  const float temperature = params_.temperature;
  const float inv_temperature = 1.0f / temperature;
  weights_.resize(vocab);
  for (size_t i = 0; i < vocab; ++i) weights_[i] = exp_nonpositive((logits[i] - best) * inv_temperature);

  const bool top_k_on = params_.top_k > 0 && static_cast<size_t>(params_.top_k) < vocab;
  const bool top_p_on = params_.top_p < 1;
  if (!top_k_on && !top_p_on && params_.min_p == 0) return draw_any(weights_, rng_);  // OpenAI's defaults

  // The filters work on candidates, ids_[0, kept): the tokens whose logit reaches a cut. Below best - 88
  // temperatures the weights are 0 and nothing can be drawn, so no cut goes lower.
  const float lowest_cut = best - 88.0f * temperature;
  const float beyond_best = std::nextafter(best, INFINITY);
  ids_.resize(vocab + 1);  // one spare: the gather writes each id before it knows whether to keep it
  size_t kept = 0;
  const auto gather = [&](float cut) {
    for (size_t i = 0; i < vocab; ++i) {
      ids_[kept] = static_cast<int32_t>(i);
      kept += logits[i] >= cut;
    }
  };
  // Higher logit first, lower id on ties: a total order, so that filters and draws are reproducible.
  const auto before = [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; };

  if (top_k_on) {
    const auto k = static_cast<size_t>(params_.top_k);
    gather(top_k_cut(logits, lowest_cut, best, k));
    if (kept > k) {
      std::nth_element(ids_.begin(), ids_.begin() + k - 1, ids_.begin() + kept, before);
      kept = k;
    }
    if (top_p_on) {
      double total = 0;
      for (size_t i = 0; i < kept; ++i) total += weights_[ids_[i]];
      kept = top_p_count(std::span(ids_).first(kept), weights_, params_.top_p * total, before);
    }
  } else if (top_p_on) {
    // Top-p keeps a prefix of the tokens by logit. Search the cuts that bracket where the prefix's mass reaches
    // top_p: every token at or above hi is kept, and only the band [lo, hi) needs selecting, once it is small. The
    // search first widens the gap below the best logit by doubling (the mass of a peaked distribution lies close to
    // it), then bisects. Its steps are bounded, as a band of tied logits (common with bf16 logits) never shrinks.
    const double target = params_.top_p * sum_of(weights_);
    float lo = lowest_cut, hi = beyond_best;
    Above at_lo{.count = vocab}, at_hi;  // at_lo's count is a bound until measured
    bool widening = true;
    for (int step = 0; step < 24 && at_lo.count - at_hi.count > 1024; ++step) {
      const float mid =
          widening ? std::max(lowest_cut, best - std::ldexp(3.0f, step) * temperature) : lo + (hi - lo) / 2;
      const Above at_mid = above(logits, weights_, mid);
      if (at_mid.mass < target && mid > lowest_cut) {
        std::tie(hi, at_hi) = std::pair(mid, at_mid);
      } else {
        std::tie(lo, at_lo) = std::pair(mid, at_mid);
        widening = false;
      }
    }
    gather(lo);
    const auto band = std::partition(ids_.begin(), ids_.begin() + kept, [&](int32_t id) { return logits[id] >= hi; });
    const auto sure = static_cast<size_t>(band - ids_.begin());
    kept = sure + top_p_count(std::span(ids_).subspan(sure, kept - sure), weights_, target - at_hi.mass, before);
  } else {
    // min-p alone: cut a little below its bound, so that the draw's own test on the weights decides.
    gather(std::max(lowest_cut, best + (std::log(params_.min_p) - 1e-3f) * temperature));
  }

  // min-p keeps the tokens with at least min_p times the best probability, that is a weight of at least min_p.
  const auto allowed = [&](float w) { return w > 0 && w >= params_.min_p; };
  double drawable = 0;
  for (size_t i = 0; i < kept; ++i)
    if (allowed(weights_[ids_[i]])) drawable += weights_[ids_[i]];
  double draw = std::uniform_real_distribution<double>(0.0, drawable)(rng_);
  int32_t last = -1;  // the best token is always allowed, so some token is
  for (size_t i = 0; i < kept; ++i) {
    if (!allowed(weights_[ids_[i]])) continue;
    last = ids_[i];
    if ((draw -= weights_[last]) < 0) return last;
  }
  return last;  // rounding left a sliver of the draw past the last allowed token
}

}  // namespace kvarn::engine
