// libFuzzer target for the safetensors header parser: any byte string must either parse into a header whose
// ranges lie inside the input, or be refused with kvarn::Error — never crash, hang or read out of bounds.
#include "model/safetensors.h"
#include "util/error.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto header = kvarn::model::parse_safetensors(bytes, "fuzz");
    for (const auto& [name, t] : header.tensors)
      if (header.data_offset + t.end > size) std::abort();
  } catch (const kvarn::Error&) {
  }
  return 0;
}
