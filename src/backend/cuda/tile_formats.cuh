#pragma once
// The tile formats the attention kernels are compiled for, as compile-time types, and the dispatch from a cache's
// runtime layout to one of them: KVarN / rtn / rot code tiles (4-bit keys, 2- or 4-bit values) and fp16 tiles,
// head_dim 64 and 128, G 64 and 128.
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kv_layout.h"
#include "codec/tile_layout.h"

#include <string>

namespace kvarn::cuda {

template <int D_, int G_, int VB_>
struct KvarnTile {
  static constexpr int D = D_, G = G_, VB = VB_;
  static constexpr bool kCodes = true;
  static constexpr codec::TileLayout L = codec::TileLayout::codes(D, G, 4, VB);
};

template <int D_, int G_>
struct Fp16Tile {
  static constexpr int D = D_, G = G_;
  static constexpr bool kCodes = false;
  static constexpr codec::TileLayout L = codec::TileLayout::plain(D, G, 16);
};

// Calls fn(F{}) with the tile format of the cache; `kernel` names the caller in the error for other formats.
template <class Fn>
void with_tile_format(const KvCacheLayer& cache, const char* kernel, Fn&& fn) {
  const codec::TileLayout& l = cache.layout;
  const int d = l.head_dim, g = l.tokens;
  if (!l.code_tile) {
    if (d == 128 && g == 128) return fn(Fp16Tile<128, 128>{});
    if (d == 128 && g == 64) return fn(Fp16Tile<128, 64>{});
    if (d == 64 && g == 128) return fn(Fp16Tile<64, 128>{});
    if (d == 64 && g == 64) return fn(Fp16Tile<64, 64>{});
  } else if (l.key_bits == 4) {
    const int vb = l.value_bits;
    if (d == 128 && g == 128 && vb == 2) return fn(KvarnTile<128, 128, 2>{});
    if (d == 128 && g == 128 && vb == 4) return fn(KvarnTile<128, 128, 4>{});
    if (d == 128 && g == 64 && vb == 2) return fn(KvarnTile<128, 64, 2>{});
    if (d == 128 && g == 64 && vb == 4) return fn(KvarnTile<128, 64, 4>{});
    if (d == 64 && g == 128 && vb == 2) return fn(KvarnTile<64, 128, 2>{});
    if (d == 64 && g == 128 && vb == 4) return fn(KvarnTile<64, 128, 4>{});
    if (d == 64 && g == 64 && vb == 2) return fn(KvarnTile<64, 64, 2>{});
    if (d == 64 && g == 64 && vb == 4) return fn(KvarnTile<64, 64, 4>{});
  }
  throw_error(std::string(kernel) + ": no kernel for head_dim " + std::to_string(d) + ", G " + std::to_string(g) +
              ", bits " + std::to_string(l.key_bits) + "/" + std::to_string(l.value_bits));
}

}  // namespace kvarn::cuda
