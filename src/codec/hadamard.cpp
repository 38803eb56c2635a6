#include "codec/hadamard.h"

#include <cmath>

namespace kvarn::codec {

void hadamard_rotate(float* x, int d) {
  for (int step = 1; step < d; step *= 2) {
    for (int block = 0; block < d; block += 2 * step) {
      for (int i = block; i < block + step; ++i) {
        const float a = x[i], b = x[i + step];
        x[i] = a + b;
        x[i + step] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));
  for (int i = 0; i < d; ++i) x[i] *= norm;
}

void hadamard_rotate_rows(float* x, int rows, int d) {
  for (int r = 0; r < rows; ++r) hadamard_rotate(x + static_cast<long>(r) * d, d);
}

}  // namespace kvarn::codec
