#pragma once
// kvarn::Error: the one exception type of the project. Messages name the file/field and what was expected,
// e.g. Error("config.json: field 'head_dim': expected a positive integer, got -3").
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace kvarn {

class Error : public std::runtime_error {
public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}

  template <typename... Args>
  explicit Error(fmt::format_string<Args...> format, Args&&... args)
      : std::runtime_error(fmt::format(format, std::forward<Args>(args)...)) {}
};

}  // namespace kvarn
