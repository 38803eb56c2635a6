#pragma once
// Where tests find ../shared (models, golden outputs): $KVARN_SHARED, else the folder beside the checkout.
#include <cstdlib>
#include <filesystem>

namespace kvarn::test {

inline std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("KVARN_SHARED"); env && *env) return env;
  return KVARN_SHARED_DIR;
}

}  // namespace kvarn::test
