#include "codec/cache_dtype.h"

#include "util/error.h"

#include <fmt/ranges.h>

namespace kvarn::codec {

namespace {
const std::vector<CacheDtype>& all_dtypes() {
  static const std::vector<CacheDtype> dtypes = {
      {"fp32", Method::fp32, 32, 32, 0},
      {"fp16", Method::fp16, 16, 16, 0},
      {"fp8_e4m3", Method::fp8_e4m3, 8, 8, 0},
      {"rtn_k4v2_g128", Method::rtn, 4, 2, 128},
      {"rot_k4v2_g128", Method::rot, 4, 2, 128},
      {"kvarn_k4v2_g128", Method::kvarn, 4, 2, 128},
      {"kvarn_k4v4_g128", Method::kvarn, 4, 4, 128},
      {"kvarn_k4v2_g64", Method::kvarn, 4, 2, 64},
      {"kvarn_k4v4_g64", Method::kvarn, 4, 4, 64},
  };
  return dtypes;
}
}  // namespace

CacheDtype parse_cache_dtype(std::string_view name) {
  const std::string_view canonical = name == "auto" ? "fp16" : name == "fp8" ? "fp8_e4m3" : name;
  for (const auto& dtype : all_dtypes())
    if (dtype.name == canonical) return dtype;
  throw Error("--kv-cache-dtype: unknown cache dtype '{}'; expected one of auto, fp8, {}", name,
              fmt::join(cache_dtype_names(), ", "));
}

int resolve_block_size(const CacheDtype& dtype, int requested) {
  if (dtype.tile_tokens == 0) return requested > 0 ? requested : 128;
  if (requested > 0 && requested != dtype.tile_tokens)
    throw Error("--block-size {} contradicts --kv-cache-dtype {}, whose tiles hold {} tokens", requested, dtype.name,
                dtype.tile_tokens);
  return dtype.tile_tokens;
}

const std::vector<std::string>& cache_dtype_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& dtype : all_dtypes()) out.push_back(dtype.name);
    return out;
  }();
  return names;
}

}  // namespace kvarn::codec
