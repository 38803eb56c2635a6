#pragma once
// Asymmetric round-to-nearest of one row over all its elements (spec step 4) and the bit packing of codes.
#include <cstdint>

namespace kvarn::codec {

struct RowRange {
  float lo;     // row minimum: the zero point
  float scale;  // max((hi - lo) / (2^bits - 1), 1e-10)
};

// codes[i] = clamp(round_half_even((row[i] - lo) * (1 / scale)), 0, 2^bits - 1), one code per byte.
RowRange quantize_row(const float* row, int n, int bits, uint8_t* codes);

// Code i sits at bit i*bits of `packed` (n*bits/8 bytes), lower index in lower bits. bits in {2, 4, 8}.
void pack_codes(const uint8_t* codes, int n, int bits, uint8_t* packed);
void unpack_codes(const uint8_t* packed, int n, int bits, uint8_t* codes);

}  // namespace kvarn::codec
