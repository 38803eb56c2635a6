#pragma once
// The KV cache dtypes kvarn stores: fp16 (the baseline), fp32 (the exact reference of the CPU backend), fp8-e4m3, the four KVarN presets, and two ablations that
// share KVarN's tile layout and bit widths: rtn (plain asymmetric round-to-nearest, KIVI-style) and rot (Hadamard
// rotation + RTN, no variance normalization). See ../shared/spec/kvarn-format.md.
#include <string>
#include <string_view>
#include <vector>

namespace kvarn::codec {

enum class Method { fp32, fp16, fp8_e4m3, rtn, rot, kvarn };

// Whether a method stores integer codes with folded per-row/per-column scales (the KVarN tile layout).
constexpr bool stores_code_tiles(Method method) {
  return method == Method::rtn || method == Method::rot || method == Method::kvarn;
}

struct CacheDtype {
  std::string name;
  Method method = Method::fp16;
  int key_bits = 16;
  int value_bits = 16;
  int tile_tokens = 0;  // fixed by the name (e.g. g128); 0 for fp32/fp16/fp8, whose tile follows --block-size

  // Keys and values are stored Hadamard-rotated: the attention rotates the query and un-rotates its output.
  bool rotated() const { return method == Method::rot || method == Method::kvarn; }
  // Stored as integer codes with folded per-row/per-column scales (the KVarN tile layout).
  bool code_tile() const { return stores_code_tiles(method); }
  bool normalized() const { return method == Method::kvarn; }
  // The fp16 tail slot holds fp32 for the fp32 reference dtype, so that nothing is rounded.
  int tail_element_bytes() const { return method == Method::fp32 ? 4 : 2; }
};

// Accepts every name of cache_dtype_names() plus the aliases "auto" (fp16) and "fp8" (fp8_e4m3).
CacheDtype parse_cache_dtype(std::string_view name);

// The block size a cache dtype implies: its own tile size, or `requested` (0: 128) for fp32/fp16/fp8.
// A requested size that contradicts the dtype's tile size is an error naming both.
int resolve_block_size(const CacheDtype& dtype, int requested);

// Canonical names, baselines first: fp32, fp16, fp8_e4m3, rtn_k4v2_g128, rot_k4v2_g128, then the KVarN presets.
const std::vector<std::string>& cache_dtype_names();

}  // namespace kvarn::codec
