// StopChecker: eos ends a request unless ignore_eos, stop_token_ids always do, both as "stop" and without their
// text; max_tokens ends it as "length". Stop strings are found across token boundaries and cut from the output with
// everything after them; text that could begin a stop string is held back, and released as soon as it cannot, or
// when the request ends. Whatever the split into pieces, the streamed text is the full text up to the first stop
// string.
#include "engine/stop_conditions.h"

#include "util/error.h"

#include <gtest/gtest.h>

#include <random>

namespace kvarn::engine {
namespace {

const std::vector<int32_t> kEos = {2};
constexpr int32_t kText = 10;  // any token that is neither eos nor a stop token

// What each push returns, for pieces pushed as plain tokens.
std::vector<std::string> stream(StopChecker& checker, const std::vector<std::string>& pieces) {
  std::vector<std::string> out;
  for (const auto& piece : pieces) out.push_back(checker.push(kText, piece));
  return out;
}

using Pieces = std::vector<std::string>;

TEST(StopChecker, StopStringSpanningPiecesIsCutWithWhatFollows) {
  StopChecker checker({.stop = {"lo w"}}, kEos);
  // "l", then "lo", could begin the stop string: held back until the stop string completes
  EXPECT_EQ(stream(checker, {"Hel", "lo", " wor"}), (Pieces{"He", "l", ""}));
  EXPECT_EQ(checker.finish_reason(), "stop");
}

TEST(StopChecker, StopStringInsideOnePiece) {
  StopChecker checker({.stop = {"STOP"}}, kEos);
  EXPECT_EQ(stream(checker, {"foo STOP bar"}), (Pieces{"foo "}));
  EXPECT_EQ(checker.finish_reason(), "stop");
}

TEST(StopChecker, StopStringOverManyPieces) {
  StopChecker checker({.stop = {"<|end|>"}}, kEos);
  EXPECT_EQ(stream(checker, {"ok<|", "en", "d|", ">tail"}), (Pieces{"ok", "", "", ""}));
  EXPECT_TRUE(checker.finished());
}

TEST(StopChecker, TheEarliestStopStringWins) {
  StopChecker checker({.stop = {"world", "lo"}}, kEos);
  EXPECT_EQ(stream(checker, {"hello world"}), (Pieces{"hel"}));
}

TEST(StopChecker, HeldBackTextIsReleasedWhenItIsNoStopString) {
  StopChecker checker({.stop = {"</s>"}}, kEos);
  EXPECT_EQ(stream(checker, {"a<", "/", "b"}), (Pieces{"a", "", "</b"}));
  EXPECT_FALSE(checker.finished());
  // A held tail that stops being a prefix may still end in a shorter one: "aaa" ends with the prefix "aa" of "aab".
  StopChecker overlap({.stop = {"aab"}}, kEos);
  EXPECT_EQ(stream(overlap, {"a", "a", "a", "b"}), (Pieces{"", "", "a", ""}));
  EXPECT_EQ(overlap.finish_reason(), "stop");
}

TEST(StopChecker, HeldBackTextIsReleasedAtTheEnd) {
  StopChecker length({.max_tokens = 2, .stop = {"END"}}, kEos);
  EXPECT_EQ(stream(length, {"x", "EN"}), (Pieces{"x", "EN"}));
  EXPECT_EQ(length.finish_reason(), "length");

  StopChecker eos({.stop = {"END"}}, kEos);
  EXPECT_EQ(stream(eos, {"ab", "E"}), (Pieces{"ab", ""}));
  EXPECT_EQ(eos.push(kEos[0], "</s>"), "E");  // the eos token's own text is not output
  EXPECT_EQ(eos.finish_reason(), "stop");
}

TEST(StopChecker, EosStopsUnlessIgnored) {
  StopChecker checker({}, kEos);
  EXPECT_EQ(checker.push(kText, "a"), "a");
  EXPECT_EQ(checker.push(kEos[0], "</s>"), "");
  EXPECT_EQ(checker.finish_reason(), "stop");

  StopChecker ignoring({.max_tokens = 2, .ignore_eos = true}, kEos);
  EXPECT_EQ(ignoring.push(kEos[0], "</s>"), "</s>");
  EXPECT_FALSE(ignoring.finished());
  EXPECT_EQ(ignoring.push(kEos[0], "</s>"), "</s>");
  EXPECT_EQ(ignoring.finish_reason(), "length");
}

TEST(StopChecker, StopTokenIdsStopEvenWhenEosIsIgnored) {
  StopChecker checker({.stop_token_ids = {7, 8}, .ignore_eos = true}, kEos);
  EXPECT_EQ(checker.push(kText, "a"), "a");
  EXPECT_EQ(checker.push(8, "<tool>"), "");
  EXPECT_EQ(checker.finish_reason(), "stop");
}

TEST(StopChecker, MaxTokensIsLengthUnlessTheLastTokenStops) {
  StopChecker checker({.max_tokens = 3}, kEos);
  EXPECT_EQ(stream(checker, {"a", "b"}), (Pieces{"a", "b"}));
  EXPECT_FALSE(checker.finished());
  EXPECT_EQ(checker.push(kText, "c"), "c");
  EXPECT_EQ(checker.finish_reason(), "length");
  EXPECT_THROW(checker.push(kText, "d"), Error);

  StopChecker eos_last({.max_tokens = 1}, kEos);
  eos_last.push(kEos[0], "");
  EXPECT_EQ(eos_last.finish_reason(), "stop");
  StopChecker string_last({.max_tokens = 1, .stop = {"b"}}, kEos);
  EXPECT_EQ(string_last.push(kText, "abc"), "a");
  EXPECT_EQ(string_last.finish_reason(), "stop");
}

TEST(StopChecker, StreamIsTheTextUpToTheFirstStopStringWhateverTheSplit) {
  const std::vector<std::string> stops = {"aba", "bb", "cab"};
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string full;
    for (int i = 0; i < 12; ++i) full += "abc"[rng() % 3];
    size_t first = std::string::npos;
    for (const auto& s : stops) first = std::min(first, full.find(s));
    const std::string expected = full.substr(0, first);

    StopChecker checker({.max_tokens = 100, .stop = stops}, kEos);
    std::string streamed;
    for (size_t pos = 0; pos < full.size() && !checker.finished();) {
      const size_t n = rng() % 4;  // empty pieces too, as a detokenizer holding back a partial character gives
      streamed += checker.push(kText, full.substr(pos, n));
      pos += n;
    }
    if (!checker.finished()) streamed += checker.push(kEos[0], "");
    ASSERT_EQ(streamed, expected) << "text " << full;
    EXPECT_EQ(checker.finish_reason(), "stop");
  }
}

TEST(StopChecker, RefusesInvalidParams) {
  EXPECT_THROW(StopChecker({.max_tokens = 0}, kEos), Error);
  EXPECT_THROW(StopChecker({.stop = {""}}, kEos), Error);
}

}  // namespace
}  // namespace kvarn::engine
