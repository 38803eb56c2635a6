#include "backend/cuda/kv_layout.h"

#include "util/error.h"

namespace kvarn::cuda {

KvCacheLayer make_kv_cache_layer(const codec::CacheDtype& dtype, int head_dim, int tile_tokens, int num_kv_heads,
                                 uint8_t* blocks, uint16_t* tails) {
  if (head_dim != 64 && head_dim != 128)
    throw Error("CUDA KV cache: head_dim {} is not supported; expected 64 or 128", head_dim);
  if (tile_tokens != 64 && tile_tokens != 128)
    throw Error("CUDA KV cache: block size {} is not supported; expected 64 or 128", tile_tokens);
  if (num_kv_heads <= 0) throw Error("CUDA KV cache: num_kv_heads {} must be positive", num_kv_heads);
  KvCacheLayer layer;
  layer.blocks = blocks;
  layer.tails = tails;
  layer.num_kv_heads = num_kv_heads;
  layer.method = dtype.method;
  if (dtype.code_tile()) {
    if (tile_tokens != dtype.tile_tokens)
      throw Error("CUDA KV cache: block size {} does not match {}, whose tiles hold {} tokens", tile_tokens,
                  dtype.name, dtype.tile_tokens);
    if (dtype.key_bits != 4 || (dtype.value_bits != 2 && dtype.value_bits != 4))
      throw Error("CUDA KV cache: {} has {}-bit keys and {}-bit values; the kernels serve 4-bit keys and 2- or "
                  "4-bit values", dtype.name, dtype.key_bits, dtype.value_bits);
    layer.layout = codec::TileLayout::codes(head_dim, tile_tokens, dtype.key_bits, dtype.value_bits);
  } else if (dtype.method == codec::Method::fp16) {
    layer.layout = codec::TileLayout::plain(head_dim, tile_tokens, 16);
  } else {
    throw Error("CUDA KV cache: cache dtype {} is not served by the CUDA backend", dtype.name);
  }
  return layer;
}

}  // namespace kvarn::cuda
