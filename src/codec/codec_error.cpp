#include "codec/codec_error.h"

#include "codec/hadamard.h"
#include "util/error.h"

#include <algorithm>
#include <vector>

namespace kvarn::codec {

CodecError& CodecError::operator+=(const CodecError& o) {
  key_err2 += o.key_err2, key_ref2 += o.key_ref2;
  value_err2 += o.value_err2, value_ref2 += o.value_ref2;
  output_err2 += o.output_err2, output_ref2 += o.output_ref2;
  return *this;
}

namespace {

// softmax(q K^T * scale) V over `context` tokens, in float64.
std::vector<double> attend(const float* q, const float* keys, const float* values, int context, int d) {
  std::vector<double> p(context);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  double max = -1e300;
  for (int t = 0; t < context; ++t) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * keys[static_cast<size_t>(t) * d + c];
    p[t] = dot * scale;
    max = std::max(max, p[t]);
  }
  double sum = 0;
  for (double& x : p) sum += (x = std::exp(x - max));
  std::vector<double> out(d, 0.0);
  for (int t = 0; t < context; ++t)
    for (int c = 0; c < d; ++c) out[c] += p[t] / sum * values[static_cast<size_t>(t) * d + c];
  return out;
}

}  // namespace

CodecError measure_codec_error(const TileCodec& codec, std::span<const float> keys, std::span<const float> values,
                               int tokens) {
  const int d = codec.layout().head_dim, g = codec.layout().tokens, context = tokens - kHeldOutTokens;
  if (context <= 0 || context % g != 0)
    throw Error("codec error: {} tokens leave {} for the cache; expected a positive multiple of the tile size {}",
                tokens, context, g);
  std::vector<float> k(static_cast<size_t>(context) * d), v(k.size());
  std::vector<uint8_t> tile(codec.layout().bytes);
  for (int start = 0; start < context; start += g) {
    const size_t at = static_cast<size_t>(start) * d;
    codec.encode(keys.data() + at, values.data() + at, tile.data());
    codec.decode(tile.data(), k.data() + at, v.data() + at);
  }
  if (codec.dtype().rotated()) {  // back to the model space
    hadamard_rotate_rows(k.data(), context, d);
    hadamard_rotate_rows(v.data(), context, d);
  }
  CodecError e;
  for (size_t i = 0; i < k.size(); ++i) {
    e.key_err2 += (static_cast<double>(k[i]) - keys[i]) * (static_cast<double>(k[i]) - keys[i]);
    e.key_ref2 += static_cast<double>(keys[i]) * keys[i];
    e.value_err2 += (static_cast<double>(v[i]) - values[i]) * (static_cast<double>(v[i]) - values[i]);
    e.value_ref2 += static_cast<double>(values[i]) * values[i];
  }
  for (int t = context; t < tokens; ++t) {
    const float* q = keys.data() + static_cast<size_t>(t) * d;
    const auto exact = attend(q, keys.data(), values.data(), context, d);
    const auto approx = attend(q, k.data(), v.data(), context, d);
    for (int c = 0; c < d; ++c) {
      e.output_err2 += (approx[c] - exact[c]) * (approx[c] - exact[c]);
      e.output_ref2 += exact[c] * exact[c];
    }
  }
  return e;
}

}  // namespace kvarn::codec
