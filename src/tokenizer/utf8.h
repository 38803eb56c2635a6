#pragma once
// UTF-8 helpers for the tokenizer: lossy decoding of byte strings (invalid sequences become U+FFFD, as Rust's
// from_utf8_lossy, which Hugging Face decoders use) and code point iteration.
#include <cstdint>
#include <string>
#include <string_view>

namespace kvarn::tokenizer {

std::string utf8_lossy(std::string_view bytes);
void append_utf8(std::string& out, uint32_t code_point);
// Length of the valid UTF-8 sequence starting at s[0], or 0 if it is invalid or truncated.
size_t valid_utf8_prefix(std::string_view s);

}  // namespace kvarn::tokenizer
