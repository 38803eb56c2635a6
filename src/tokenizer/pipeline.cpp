#include "tokenizer/pipeline.h"

#include "tokenizer/byte_level.h"
#include "tokenizer/utf8.h"
#include "util/error.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <nlohmann/json.hpp>
#include <pcre2.h>
#include <utf8proc.h>

#include <memory>

namespace kvarn::tokenizer {

namespace {

using nlohmann::json;

std::string type_of(const json& config, const std::string& where) {
  if (!config.is_object() || !config.contains("type") || !config["type"].is_string())
    throw Error("{}: expected an object with a string 'type'", where);
  return config["type"].get<std::string>();
}

// Replace's pattern: {"String": s}. (Regex patterns appear in no tokenizer we serve yet.)
std::string string_pattern(const json& config, const std::string& where) {
  if (!config.contains("pattern") || !config["pattern"].contains("String"))
    throw Error("{}.pattern: only {{\"String\": ...}} patterns are supported", where);
  return config["pattern"]["String"].get<std::string>();
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  if (from.empty()) return text;
  std::string out;
  size_t at = 0;
  for (size_t hit; (hit = text.find(from, at)) != std::string::npos; at = hit + from.size())
    out.append(text, at, hit - at).append(to);
  return out.append(text, at);
}

// A compiled PCRE2 regex (UTF + Unicode properties), splitting text into matches and the gaps between them.
class Regex {
public:
  Regex(const std::string& pattern, const std::string& where) {
    int error;
    PCRE2_SIZE offset;
    code_ = std::shared_ptr<pcre2_code>(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                                      PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr),
                                        pcre2_code_free);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      throw Error("{}: regex does not compile at offset {}: {}", where, offset, reinterpret_cast<char*>(message));
    }
    pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);  // best effort: falls back to the interpreter
  }

  // "Isolated": every match and every non-empty gap becomes a piece, in order.
  std::vector<std::string> split(const std::string& text) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    std::vector<std::string> pieces;
    size_t at = 0, gap = 0;
    while (at <= text.size()) {
      const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), at, 0,
                                 match.get(), nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match.get());
      if (ov[1] == ov[0]) {  // empty match: step one character
        at = ov[0] + std::max<size_t>(1, valid_utf8_prefix(std::string_view(text).substr(ov[0])));
        continue;
      }
      if (ov[0] > gap) pieces.push_back(text.substr(gap, ov[0] - gap));
      pieces.push_back(text.substr(ov[0], ov[1] - ov[0]));
      at = gap = ov[1];
    }
    if (gap < text.size()) pieces.push_back(text.substr(gap));
    return pieces;
  }

private:
  std::shared_ptr<pcre2_code> code_;
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

Normalizer make_normalizer(const json& config, const std::string& where) {
  if (config.is_null()) return [](std::string s) { return s; };
  const std::string type = type_of(config, where);
  if (type == "Sequence") {
    std::vector<Normalizer> steps;
    for (size_t i = 0; i < config["normalizers"].size(); ++i)
      steps.push_back(make_normalizer(config["normalizers"][i], fmt::format("{}.normalizers[{}]", where, i)));
    return [steps](std::string s) {
      for (const auto& step : steps) s = step(std::move(s));
      return s;
    };
  }
  if (type == "NFC")
    return [](std::string s) {
      std::unique_ptr<utf8proc_uint8_t, decltype(&free)> nfc(
          utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str())), free);
      return nfc ? std::string(reinterpret_cast<const char*>(nfc.get())) : s;
    };
  if (type == "Prepend") {
    const std::string prefix = config.at("prepend").get<std::string>();
    return [prefix](std::string s) { return s.empty() ? s : prefix + s; };
  }
  if (type == "Replace") {
    const std::string from = string_pattern(config, where), to = config.at("content").get<std::string>();
    return [from, to](std::string s) { return replace_all(std::move(s), from, to); };
  }
  throw Error("{}: normalizer type '{}' is not supported (NFC, Prepend, Replace, Sequence)", where, type);
}

PreTokenizer make_pre_tokenizer(const json& config, const std::string& where) {
  if (config.is_null()) return [](std::vector<std::string> words) { return words; };
  const std::string type = type_of(config, where);
  if (type == "Sequence") {
    std::vector<PreTokenizer> steps;
    for (size_t i = 0; i < config["pretokenizers"].size(); ++i)
      steps.push_back(make_pre_tokenizer(config["pretokenizers"][i], fmt::format("{}.pretokenizers[{}]", where, i)));
    return [steps](std::vector<std::string> words) {
      for (const auto& step : steps) words = step(std::move(words));
      return words;
    };
  }
  auto split_each = [](std::shared_ptr<Regex> regex) {
    return [regex](std::vector<std::string> words) {
      std::vector<std::string> out;
      for (const auto& w : words)
        for (auto& piece : regex->split(w)) out.push_back(std::move(piece));
      return out;
    };
  };
  if (type == "Split") {
    if (!config.contains("pattern") || !config["pattern"].contains("Regex"))
      throw Error("{}.pattern: expected {{\"Regex\": ...}}", where);
    if (config.value("behavior", "") != "Isolated" || config.value("invert", false))
      throw Error("{}: only behavior 'Isolated' without invert is supported", where);
    return split_each(std::make_shared<Regex>(config["pattern"]["Regex"].get<std::string>(), where + ".pattern"));
  }
  if (type == "ByteLevel") {
    const bool prefix_space = config.value("add_prefix_space", false);
    auto split = config.value("use_regex", true) ? split_each(std::make_shared<Regex>(kGpt2Pattern, where))
                                                 : PreTokenizer([](std::vector<std::string> w) { return w; });
    return [prefix_space, split](std::vector<std::string> words) {
      if (prefix_space && !words.empty() && !words[0].empty() && words[0][0] != ' ') words[0] = " " + words[0];
      words = split(std::move(words));
      for (auto& w : words) w = bytes_to_unicode(w);
      return words;
    };
  }
  throw Error("{}: pre-tokenizer type '{}' is not supported (Split, ByteLevel, Sequence)", where, type);
}

Decoder make_decoder(const json& config, const std::string& where) {
  if (config.is_null()) return [](std::vector<std::string> tokens) { return tokens; };
  const std::string type = type_of(config, where);
  if (type == "Sequence") {
    std::vector<Decoder> steps;
    for (size_t i = 0; i < config["decoders"].size(); ++i)
      steps.push_back(make_decoder(config["decoders"][i], fmt::format("{}.decoders[{}]", where, i)));
    return [steps](std::vector<std::string> tokens) {
      for (const auto& step : steps) tokens = step(std::move(tokens));
      return tokens;
    };
  }
  if (type == "Replace") {
    const std::string from = string_pattern(config, where), to = config.at("content").get<std::string>();
    return [from, to](std::vector<std::string> tokens) {
      for (auto& t : tokens) t = replace_all(std::move(t), from, to);
      return tokens;
    };
  }
  if (type == "ByteFallback")
    return [](std::vector<std::string> tokens) {
      // Runs of <0xNN> tokens become their bytes, decoded lossily as one string.
      std::vector<std::string> out;
      std::string bytes;
      auto flush = [&] {
        if (!bytes.empty()) out.push_back(utf8_lossy(bytes));
        bytes.clear();
      };
      for (auto& t : tokens) {
        if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>') {
          bytes += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      return out;
    };
  if (type == "Fuse")
    return [](std::vector<std::string> tokens) {
      std::string all;
      for (const auto& t : tokens) all += t;
      return std::vector<std::string>{all};
    };
  if (type == "Strip") {
    const std::string content = config.at("content").get<std::string>();
    const int start = config.value("start", 0), stop = config.value("stop", 0);
    return [content, start, stop](std::vector<std::string> tokens) {
      for (auto& t : tokens) {
        for (int i = 0; i < start && t.starts_with(content); ++i) t.erase(0, content.size());
        for (int i = 0; i < stop && t.ends_with(content); ++i) t.erase(t.size() - content.size());
      }
      return tokens;
    };
  }
  if (type == "ByteLevel")
    return [](std::vector<std::string> tokens) {
      std::string all;
      for (const auto& t : tokens) all += t;
      return std::vector<std::string>{utf8_lossy(unicode_to_bytes(all))};
    };
  throw Error("{}: decoder type '{}' is not supported (ByteLevel, Replace, ByteFallback, Fuse, Strip, Sequence)",
              where, type);
}

}  // namespace kvarn::tokenizer
