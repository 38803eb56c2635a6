#pragma once
// Rotary position embedding tables as Hugging Face transformers computes them (fp32 inverse frequencies,
// rotate_half convention), with the "linear" and "llama3" frequency scalings.
#include <cstdint>
#include <span>
#include <vector>

namespace kvarn::model {

struct RopeScaling {
  enum class Type { none, linear, llama3 } type = Type::none;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 8192;
};

class Rope {
public:
  Rope(int head_dim, double theta, const RopeScaling& scaling);

  // out [positions][head_dim]: cos of the D/2 angles, then their sin.
  void cos_sin(std::span<const int32_t> positions, float* out) const;
  const std::vector<float>& inv_freq() const { return inv_freq_; }

private:
  int head_dim_;
  std::vector<float> inv_freq_;
};

}  // namespace kvarn::model
