#include "tokenizer/tokenizer.h"

#include "util/error.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace kvarn::tokenizer {

namespace {
using nlohmann::json;

std::vector<std::pair<std::string, std::string>> parse_merges(const json& merges, const std::string& source) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& m = merges[i];
    if (m.is_string()) {  // "a b"
      const auto s = m.get<std::string>();
      const auto space = s.find(' ');
      if (space == std::string::npos) throw Error("{}: model.merges[{}] '{}' is not 'a b'", source, i, s);
      out.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      out.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      throw Error("{}: model.merges[{}] is {}; expected \"a b\" or [\"a\", \"b\"]", source, i, m.dump());
    }
  }
  return out;
}
}  // namespace

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw Error("{}: cannot open", path.string());
  std::stringstream text;
  text << in.rdbuf();
  return parse(text.str(), path.string());
}

Tokenizer Tokenizer::parse(const std::string& text, const std::string& source) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    throw Error("{}: invalid JSON: {}", source, e.what());
  }
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object())
    throw Error("{}: missing object 'model'", source);
  const json& model = root["model"];
  if (model.value("type", "BPE") != "BPE")
    throw Error("{}: model.type '{}' is not supported; expected BPE", source, model.value("type", ""));
  if (!model.contains("vocab") || !model["vocab"].is_object()) throw Error("{}: missing object model.vocab", source);

  Tokenizer t;
  std::unordered_map<std::string, int32_t> vocab;
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0)
      throw Error("{}: model.vocab['{}'] is {}; expected a token id", source, token, id.dump());
    vocab[token] = id.get<int32_t>();
  }
  const auto added = root.value("added_tokens", json::array());
  for (size_t i = 0; i < added.size(); ++i) {
    if (!added[i].contains("id") || !added[i].contains("content"))
      throw Error("{}: added_tokens[{}] needs 'id' and 'content'", source, i);
    t.added_.push_back({added[i]["content"].get<std::string>(), added[i]["id"].get<int32_t>(),
                        added[i].value("special", false)});
  }
  int32_t size = 0;
  for (const auto& [token, id] : vocab) size = std::max(size, id + 1);
  for (const auto& a : t.added_) size = std::max(size, a.id + 1);
  t.id_to_token_.resize(size);
  t.special_.assign(size, false);
  for (const auto& [token, id] : vocab) t.id_to_token_[id] = token;
  for (const auto& a : t.added_) t.id_to_token_[a.id] = a.content, t.special_[a.id] = a.special;
  std::stable_sort(t.added_.begin(), t.added_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });

  Bpe::Options options;
  if (model.contains("unk_token") && model["unk_token"].is_string()) options.unk_token = model["unk_token"];
  options.byte_fallback = model.value("byte_fallback", false);
  options.fuse_unk = model.value("fuse_unk", false);
  options.source = source;
  t.bpe_ = std::make_shared<Bpe>(std::move(vocab), parse_merges(model.value("merges", json::array()), source),
                                 options);
  t.normalizer_ = make_normalizer(root.value("normalizer", json()), source + ": normalizer");
  t.pre_tokenizer_ = make_pre_tokenizer(root.value("pre_tokenizer", json()), source + ": pre_tokenizer");
  t.decoder_ = make_decoder(root.value("decoder", json()), source + ": decoder");
  return t;
}

void Tokenizer::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  for (const auto& word : pre_tokenizer_({normalizer_(std::string(text))})) bpe_->encode_word(word, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<int32_t> out;
  size_t plain_start = 0;
  for (size_t at = 0; parse_special && at < text.size();) {
    const auto hit = std::find_if(added_.begin(), added_.end(), [&](const AddedToken& a) {
      return !a.content.empty() && text.substr(at).starts_with(a.content);
    });
    if (hit == added_.end()) {
      ++at;
      continue;
    }
    encode_plain(text.substr(plain_start, at - plain_start), out);
    out.push_back(hit->id);
    at += hit->content.size();
    plain_start = at;
  }
  encode_plain(text.substr(plain_start), out);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::vector<std::string> tokens;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) throw Error("decode: token id {} is outside the vocabulary ({})", id, vocab_size());
    if (skip_special && special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  std::string text;
  for (const auto& piece : decoder_(std::move(tokens))) text += piece;
  return text;
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  for (const auto& a : added_)
    if (a.content == token) return a.id;
  const auto it = bpe_->vocab().find(std::string(token));
  if (it == bpe_->vocab().end()) return std::nullopt;
  return it->second;
}

std::string_view Tokenizer::token_text(int32_t id) const { return id_to_token_.at(id); }

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

std::string IncrementalDetokenizer::push(int32_t id) {
  ids_.push_back(id);
  const std::string text = tokenizer_.decode(ids_, skip_special_);
  // Trailing U+FFFDs may be the bytes of a character whose last bytes are still to come (up to 3): hold them back.
  size_t ready = text.size();
  for (int held = 0; held < 3 && std::string_view(text).substr(0, ready).ends_with("\xef\xbf\xbd"); ++held) ready -= 3;
  if (ready <= emitted_) return {};
  std::string out = text.substr(emitted_, ready - emitted_);
  emitted_ = ready;
  return out;
}

std::string IncrementalDetokenizer::finish() {
  const std::string text = tokenizer_.decode(ids_, skip_special_);
  std::string out = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  emitted_ = text.size();
  return out;
}

}  // namespace kvarn::tokenizer
