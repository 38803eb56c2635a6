#pragma once
// Encode and decode one tile (one kv-head, layout().tokens tokens) of any cache dtype.
// Inputs and outputs are token-major float arrays [tokens][head_dim].
#include "codec/cache_dtype.h"
#include "codec/tile_layout.h"

#include <cstdint>

namespace kvarn::codec {

class TileCodec {
public:
  // tokens: the tile size, which for fp16/fp8 is the cache block size and for the code dtypes must equal the
  // dtype's own (e.g. 128 for *_g128). head_dim: a power of two in [8, 512]. Anything else throws kvarn::Error.
  TileCodec(const CacheDtype& dtype, int head_dim, int tokens, float fp8_scale = 1.0f);

  const CacheDtype& dtype() const { return dtype_; }
  const TileLayout& layout() const { return layout_; }

  // keys/values: post-RoPE, in the model's space. Rotated dtypes rotate them first. Writes layout().bytes bytes.
  // Throws kvarn::Error if any input is NaN or infinite (a broken model, not something to pack silently).
  void encode(const float* keys, const float* values, uint8_t* tile) const;
  // Same, for input already in the storage space (rotated for rotated dtypes): the cache's fp16 tail.
  void encode_stored(const float* keys, const float* values, uint8_t* tile) const;
  // keys/values out in the storage space (rotated for rotated dtypes).
  void decode(const uint8_t* tile, float* keys, float* values) const;

private:
  CacheDtype dtype_;
  TileLayout layout_;
  float fp8_scale_;
};

// Validates a head_dim for the cache: power of two in [8, 512]. Throws kvarn::Error naming the value.
void check_head_dim(int head_dim);

}  // namespace kvarn::codec
