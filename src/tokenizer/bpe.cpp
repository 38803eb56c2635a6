#include "tokenizer/bpe.h"

#include "util/error.h"

#include <fmt/format.h>

#include <queue>

namespace kvarn::tokenizer {

namespace {
size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xe) return 3;
  if ((lead >> 3) == 0x1e) return 4;
  return 1;  // a stray continuation byte stands alone
}
}  // namespace

Bpe::Bpe(std::unordered_map<std::string, int32_t> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
         Options options)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  for (int b = 0; b < 256; ++b) {
    const auto it = vocab_.find(fmt::format("<0x{:02X}>", b));
    byte_tokens_[b] = it == vocab_.end() ? -1 : it->second;
  }
  if (!options_.unk_token.empty()) {
    const auto it = vocab_.find(options_.unk_token);
    if (it == vocab_.end()) throw Error("{}: model.unk_token '{}' is not in the vocabulary", options_.source, options_.unk_token);
    unk_id_ = it->second;
  }
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const auto ia = vocab_.find(a), ib = vocab_.find(b), ir = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || ir == vocab_.end())
      throw Error("{}: model.merges[{}] '{} {}' uses a token missing from the vocabulary", options_.source, rank,
                  a, b);
    merges_.emplace(pair_key(ia->second, ib->second), Merge{static_cast<int32_t>(rank), ir->second});
  }
}

void Bpe::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> symbols;
  bool previous_unk = false;
  for (size_t at = 0; at < word.size();) {
    const size_t len = std::min(utf8_length(static_cast<unsigned char>(word[at])), word.size() - at);
    const auto it = vocab_.find(std::string(word.substr(at, len)));
    if (it != vocab_.end()) {
      symbols.push_back({it->second, 0, 0});
      previous_unk = false;
    } else if (options_.byte_fallback && byte_tokens_[static_cast<unsigned char>(word[at])] >= 0) {
      for (size_t i = 0; i < len; ++i) symbols.push_back({byte_tokens_[static_cast<unsigned char>(word[at + i])], 0, 0});
      previous_unk = false;
    } else if (unk_id_ >= 0) {
      if (!(options_.fuse_unk && previous_unk)) symbols.push_back({unk_id_, 0, 0});
      previous_unk = true;
    } else {
      throw Error("tokenizer: '{}' is not in the vocabulary and the model has no unk token or byte fallback",
                  word.substr(at, len));
    }
    at += len;
  }
  const int n = static_cast<int>(symbols.size());
  for (int i = 0; i < n; ++i) symbols[i].prev = i - 1, symbols[i].next = i + 1 < n ? i + 1 : -1;

  struct Candidate {
    int32_t rank;
    int left;
    int32_t left_id, right_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto consider = [&](int left) {
    if (left < 0 || symbols[left].next < 0) return;
    const int right = symbols[left].next;
    const auto it = merges_.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) heap.push({it->second.rank, left, symbols[left].id, symbols[right].id});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.left];
    // Stale entries: the left symbol was merged away or changed, or its neighbour did.
    if (left.id != c.left_id || left.next < 0 || symbols[left.next].id != c.right_id) continue;
    const int right = left.next;
    left.id = merges_.at(pair_key(c.left_id, c.right_id)).result;
    left.next = symbols[right].next;
    if (left.next >= 0) symbols[left.next].prev = c.left;
    symbols[right].id = -1;  // dead
    consider(left.prev);
    consider(c.left);
  }
  for (int i = n > 0 ? 0 : -1; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

}  // namespace kvarn::tokenizer
