#include "model/rope.h"

#include <cmath>
#include <numbers>

namespace kvarn::model {

Rope::Rope(int head_dim, double theta, const RopeScaling& s) : head_dim_(head_dim), inv_freq_(head_dim / 2) {
  for (int i = 0; i < head_dim / 2; ++i) {
    // fp32 like transformers: 1 / base^(2i/D)
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq_[i] = 1.0f / std::pow(static_cast<float>(theta), exponent);
  }
  if (s.type == RopeScaling::Type::linear) {
    for (float& f : inv_freq_) f /= s.factor;
  } else if (s.type == RopeScaling::Type::llama3) {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    const float low_freq_wavelen = s.original_max_position / s.low_freq_factor;
    const float high_freq_wavelen = s.original_max_position / s.high_freq_factor;
    for (float& f : inv_freq_) {
      const float wavelen = 2 * std::numbers::pi_v<float> / f;
      if (wavelen > low_freq_wavelen) {
        f /= s.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const float smooth =
            (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
  }
}

void Rope::cos_sin(std::span<const int32_t> positions, float* out) const {
  const int half = head_dim_ / 2;
  for (size_t r = 0; r < positions.size(); ++r) {
    float* row = out + r * head_dim_;
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[r]) * inv_freq_[i];  // fp32 product, as transformers
      row[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      row[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

}  // namespace kvarn::model
