#pragma once
// Synthetic post-RoPE keys and values with what large models show and our small test models do not: a few key
// channels 10-30x larger than the rest (with a consistent offset, as real outlier channels have) and
// attention-sink tokens whose keys and values are 50-100x larger. Deterministic for a given seed.
#include <cstdint>
#include <vector>

namespace kvarn::codec {

struct SyntheticKvOptions {
  int tokens = 128;
  int head_dim = 128;
  int outlier_channels = 4;
  float outlier_min = 10, outlier_max = 30;
  std::vector<int> sink_tokens = {0};
  float sink_min = 50, sink_max = 100;
  uint64_t seed = 1;
};

struct SyntheticKv {
  std::vector<float> keys;    // [tokens][head_dim]
  std::vector<float> values;  // [tokens][head_dim]
};

SyntheticKv synthetic_kv(const SyntheticKvOptions& options);

}  // namespace kvarn::codec
