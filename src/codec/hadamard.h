#pragma once
// The normalized Sylvester-Hadamard transform H_D (symmetric, orthonormal, self-inverse) applied in place:
// the fast Walsh-Hadamard butterfly, then scaling by 1/sqrt(D). D must be a power of two.
namespace kvarn::codec {

void hadamard_rotate(float* x, int d);
void hadamard_rotate_rows(float* x, int rows, int d);

}  // namespace kvarn::codec
