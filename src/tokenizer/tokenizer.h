#pragma once
// A Hugging Face tokenizer.json: BPE in both families (byte-level as GPT-2/Llama-3/Qwen, and SentencePiece-style
// with byte fallback as Llama-2), added/special tokens matched before BPE, and the decoders that invert them.
#include "tokenizer/bpe.h"
#include "tokenizer/pipeline.h"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvarn::tokenizer {

class Tokenizer {
public:
  static Tokenizer load(const std::filesystem::path& tokenizer_json);
  static Tokenizer parse(const std::string& json_text, const std::string& source);

  // parse_special: added tokens in the text ("<|im_start|>") become their ids, as Hugging Face does by default.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
  std::optional<int32_t> token_id(std::string_view token) const;
  std::string_view token_text(int32_t id) const;
  bool is_special(int32_t id) const;

private:
  struct AddedToken {
    std::string content;
    int32_t id;
    bool special;
  };
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;

  std::shared_ptr<Bpe> bpe_;
  Normalizer normalizer_;
  PreTokenizer pre_tokenizer_;
  Decoder decoder_;
  std::vector<AddedToken> added_;  // longest first, for leftmost-longest matching
  std::vector<std::string> id_to_token_;
  std::vector<bool> special_;
};

// Streaming text for a growing list of ids: never emits a partial UTF-8 character, and the concatenation of what
// it emits (plus finish()) equals decode(all ids).
class IncrementalDetokenizer {
public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special = false)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  std::string push(int32_t id);
  std::string finish();

private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t emitted_ = 0;  // bytes of decode(ids_) already returned
};

}  // namespace kvarn::tokenizer
