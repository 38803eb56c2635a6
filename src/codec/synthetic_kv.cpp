#include "codec/synthetic_kv.h"

#include <cmath>
#include <numbers>
#include <random>

namespace kvarn::codec {

namespace {
// Box-Muller on mt19937_64: the same numbers on every standard library, unlike std::normal_distribution.
struct Gaussian {
  std::mt19937_64 engine;
  double uniform() { return (static_cast<double>(engine() >> 11) + 0.5) * 0x1p-53; }
  float operator()() {
    return static_cast<float>(std::sqrt(-2.0 * std::log(uniform())) * std::cos(2 * std::numbers::pi * uniform()));
  }
};
}  // namespace

SyntheticKv synthetic_kv(const SyntheticKvOptions& o) {
  Gaussian gauss{std::mt19937_64(o.seed)};
  std::vector<float> channel_gain(o.head_dim, 1.0f), channel_offset(o.head_dim, 0.0f);
  for (int i = 0; i < o.outlier_channels; ++i) {
    const int c = static_cast<int>(gauss.engine() % o.head_dim);
    channel_gain[c] = o.outlier_min + (o.outlier_max - o.outlier_min) * static_cast<float>(gauss.uniform());
    channel_offset[c] = channel_gain[c] * (gauss.uniform() < 0.5 ? -1.0f : 1.0f);
  }
  SyntheticKv kv{std::vector<float>(static_cast<size_t>(o.tokens) * o.head_dim),
                 std::vector<float>(static_cast<size_t>(o.tokens) * o.head_dim)};
  for (int t = 0; t < o.tokens; ++t)
    for (int c = 0; c < o.head_dim; ++c) {
      kv.keys[static_cast<size_t>(t) * o.head_dim + c] = channel_gain[c] * gauss() + channel_offset[c];
      kv.values[static_cast<size_t>(t) * o.head_dim + c] = gauss();
    }
  for (int t : o.sink_tokens) {
    if (t < 0 || t >= o.tokens) continue;
    const float gain = o.sink_min + (o.sink_max - o.sink_min) * static_cast<float>(gauss.uniform());
    for (int c = 0; c < o.head_dim; ++c) {
      kv.keys[static_cast<size_t>(t) * o.head_dim + c] *= gain;
      kv.values[static_cast<size_t>(t) * o.head_dim + c] *= gain;
    }
  }
  return kv;
}

}  // namespace kvarn::codec
