#include "backend/cuda/kv_layout.h"

#include "util/error.h"

#include <cmath>
#include <cstdint>

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

namespace {

const char* method_name(codec::Method method) {
  switch (method) {
    case codec::Method::fp32: return "fp32";
    case codec::Method::fp16: return "fp16";
    case codec::Method::fp8_e4m3: return "fp8_e4m3";
    case codec::Method::rtn: return "rtn";
    case codec::Method::rot: return "rot";
    case codec::Method::kvarn: return "kvarn";
  }
  return "unknown";
}

}  // namespace

void check_kv_cache_layer(const KvCacheLayer& cache, const char* who) {
  const codec::TileLayout& l = cache.layout;
  if (cache.num_kv_heads <= 0) throw Error("{}: cache.num_kv_heads {}; expected > 0", who, cache.num_kv_heads);
  if (l.head_dim != 64 && l.head_dim != 128)
    throw Error("{}: cache.layout.head_dim {}; expected 64 or 128", who, l.head_dim);
  if (l.tokens != 64 && l.tokens != 128) throw Error("{}: cache.layout.tokens {}; expected 64 or 128", who, l.tokens);
  const bool code_method = codec::stores_code_tiles(cache.method);
  if (!code_method && cache.method != codec::Method::fp16)
    throw Error("{}: cache.method {}; expected fp16, rtn, rot or kvarn (the CUDA kernels serve no other)", who,
                method_name(cache.method));
  if (l.code_tile != code_method)
    throw Error("{}: cache.method {} with cache.layout.code_tile {}; expected code tiles for rtn, rot and kvarn, "
                "fp16 tiles for fp16", who, method_name(cache.method), l.code_tile);
  const int d = l.head_dim, g = l.tokens;
  const bool made = code_method ? l == codec::TileLayout::codes(d, g, 4, 2) || l == codec::TileLayout::codes(d, g, 4, 4)
                                : l == codec::TileLayout::plain(d, g, 16);
  if (!made)
    throw Error("{}: cache.layout of {}-bit keys, {}-bit values and {} bytes differs from {}; expected the layout "
                "make_kv_cache_layer builds", who, l.key_bits, l.value_bits, l.bytes,
                code_method ? fmt::format("TileLayout::codes({}, {}, 4, 2 or 4)", d, g)
                            : fmt::format("TileLayout::plain({}, {}, 16)", d, g));
  if (cache.blocks) check_device_memory(cache.blocks, 16, who, "cache.blocks", "[num_blocks][num_kv_heads] tiles");
  if (cache.tails)
    check_device_memory(cache.tails, 16, who, "cache.tails", "[num_slots][2][num_kv_heads][G][D] fp16");
}

void check_softmax_scale(float scale, int head_dim, const char* who) {
  if (!std::isfinite(scale) || scale <= 0)
    throw Error("{}: scale {}; expected a finite softmax scale > 0 (1/sqrt(D) = {:.6g} for the Llama family)", who,
                scale, 1 / std::sqrt(static_cast<double>(head_dim)));
}

void check_device_memory(const void* pointer, size_t alignment, const char* who, const char* name,
                         std::string_view holds) {
  if (!pointer) throw Error("{}: {} is null; expected device memory of {}", who, name, holds);
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  if (address % alignment != 0)
    throw Error("{}: {} at 0x{:x} is not {}-byte aligned; expected device memory of {}", who, name, address,
                alignment, holds);
}

}  // namespace kvarn::cuda
