#pragma once
// How much a cache dtype disturbs what attention computes: relative errors of the decoded keys and values, and of
// the attention output softmax(q K^T / sqrt(D)) V for queries the codec never saw (held-out keys), all in float64
// against the unquantized input. Totals add up over heads and layers as sqrt(sum err^2 / sum ref^2).
#include "codec/tile_codec.h"

#include <cmath>
#include <span>

namespace kvarn::codec {

struct CodecError {
  double key_err2 = 0, key_ref2 = 0;
  double value_err2 = 0, value_ref2 = 0;
  double output_err2 = 0, output_ref2 = 0;

  double key() const { return std::sqrt(key_err2 / key_ref2); }
  double value() const { return std::sqrt(value_err2 / value_ref2); }
  double output() const { return std::sqrt(output_err2 / output_ref2); }
  CodecError& operator+=(const CodecError& other);
};

// Tokens held out of the cache; their keys serve as queries.
inline constexpr int kHeldOutTokens = 128;

// keys, values: one head's [tokens][head_dim] post-RoPE history in the model space. The first
// tokens - kHeldOutTokens tokens (a multiple of the tile size) go through the codec as the cache.
CodecError measure_codec_error(const TileCodec& codec, std::span<const float> keys, std::span<const float> values,
                               int tokens);

}  // namespace kvarn::codec
