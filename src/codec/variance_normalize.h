#pragma once
// Sinkhorn-style variance normalization of one tile X (rows x cols, row-major, fp32), spec step 3: alternately
// divide columns and rows by their standard deviation (clamped) for `iterations` rounds and keep the iterate with
// the smallest imbalance max(std)/min(std) over columns plus rows. X ~= B * col_scale * row_scale. The CUDA flush
// computes the same bits (same order of every operation, see variance_normalize.cpp).
#include <vector>

namespace kvarn::codec {

struct Normalization {
  std::vector<float> col_scale;  // per column
  std::vector<float> row_scale;  // per row
  float imbalance = 0;           // of the kept iterate
  int best_iteration = 0;        // 0 = the identity (no rescaling) was best
};

inline constexpr int kNormalizationIterations = 16;
// Sums over a row or column run as 8 ordered partials meeting in a halving tree (variance_normalize.cpp), an
// order a warp reproduces with one lane per partial.
inline constexpr int kSumPartials = 8;
// An iterate whose imbalance is within this factor of the best one's counts as a tie and is kept.
inline constexpr float kTieMargin = 1.0f + 1e-6f;
// A step multiplies a scale by its standard deviation clamped to [kStdFloor, kStdCeil] and clamps the scale to
// [kScaleMin, kScaleMax] = [e^-0.3, e^10]: the spec's log-domain step, exp being monotone.
inline constexpr float kStdFloor = 1e-3f, kStdCeil = 1e3f;
inline constexpr float kScaleMin = 0.740818220681717866f, kScaleMax = 22026.4657948067165f;

Normalization variance_normalize(const float* x, int rows, int cols, int iterations = kNormalizationIterations);

}  // namespace kvarn::codec
