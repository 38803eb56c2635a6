#include "tokenizer/byte_level.h"

#include "tokenizer/utf8.h"

#include <array>
#include <unordered_map>

namespace kvarn::tokenizer {

namespace {
struct Alphabet {
  std::array<std::string, 256> encode;
  std::unordered_map<uint32_t, unsigned char> decode;

  Alphabet() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(next++);
      append_utf8(encode[b], cp);
      decode[cp] = static_cast<unsigned char>(b);
    }
  }
};
const Alphabet& alphabet() {
  static const Alphabet a;
  return a;
}
}  // namespace

std::string bytes_to_unicode(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) out += alphabet().encode[b];
  return out;
}

std::string unicode_to_bytes(std::string_view text) {
  std::string out;
  for (size_t at = 0; at < text.size();) {
    size_t len = valid_utf8_prefix(text.substr(at));
    if (len == 0) {
      out += text[at++];
      continue;
    }
    uint32_t cp = static_cast<unsigned char>(text[at]) & (len == 1 ? 0x7f : 0x7f >> len);
    for (size_t i = 1; i < len; ++i) cp = (cp << 6) | (static_cast<unsigned char>(text[at + i]) & 0x3f);
    const auto it = alphabet().decode.find(cp);
    if (it != alphabet().decode.end()) out += static_cast<char>(it->second);
    else out.append(text.substr(at, len));
    at += len;
  }
  return out;
}

}  // namespace kvarn::tokenizer
