#pragma once
// Byte-pair encoding of one word: start from its symbols and repeatedly merge the adjacent pair of lowest merge
// rank (leftmost first on ties), as Hugging Face tokenizers does, in O(n log n) with a heap over candidate pairs.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvarn::tokenizer {

class Bpe {
public:
  struct Options {
    std::string unk_token;  // empty: none
    bool byte_fallback = false;
    bool fuse_unk = false;
    std::string source;  // the file, for error messages
  };

  Bpe(std::unordered_map<std::string, int32_t> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
      Options options);

  // word: the symbols' text (UTF-8); every UTF-8 character starts as one symbol.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

private:
  struct PairHash {
    size_t operator()(uint64_t key) const { return std::hash<uint64_t>()(key); }
  };
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  static uint64_t pair_key(int32_t a, int32_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge, PairHash> merges_;
  Options options_;
  int32_t byte_tokens_[256];  // <0xNN> ids for byte fallback, -1 when absent
  int32_t unk_id_ = -1;
};

}  // namespace kvarn::tokenizer
