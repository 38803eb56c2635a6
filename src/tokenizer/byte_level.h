#pragma once
// GPT-2's byte-level alphabet: every byte maps to a printable Unicode character, so that BPE over arbitrary bytes
// works on visible strings (space becomes 'Ġ', newline 'Ċ').
#include <string>
#include <string_view>

namespace kvarn::tokenizer {

std::string bytes_to_unicode(std::string_view bytes);
// The inverse; characters outside the alphabet are kept as their UTF-8 bytes.
std::string unicode_to_bytes(std::string_view text);

}  // namespace kvarn::tokenizer
