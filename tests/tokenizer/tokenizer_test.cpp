// Tokenizer: reproduces Hugging Face tokenizers exactly on the golden cases of every model (ids and decoded text),
// matches added tokens before BPE, streams text without splitting UTF-8 characters, and names what is wrong in a
// malformed tokenizer.json.
#include "tokenizer/tokenizer.h"

#include "shared_dir.h"
#include "util/error.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>

namespace kvarn::tokenizer {
namespace {

std::filesystem::path tokenizer_path(const std::string& model) {
  return test::shared_dir() / "models" / model / "tokenizer.json";
}

class GoldenCases : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenCases, EncodeAndDecodeMatchHuggingFace) {
  const auto tok = Tokenizer::load(tokenizer_path(GetParam()));
  std::ifstream in(test::shared_dir() / "golden" / GetParam() / "tokenizer_cases.jsonl");
  int cases = 0;
  for (std::string line; std::getline(in, line); ++cases) {
    const auto j = nlohmann::json::parse(line);
    const auto text = j["text"].get<std::string>();
    const auto ids = j["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), ids) << "text: " << j["text"].dump();
    EXPECT_EQ(tok.decode(ids), j["decoded"].get<std::string>()) << "text: " << j["text"].dump();
  }
  EXPECT_GE(cases, 30);
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenCases, ::testing::Values("stories260K", "kvarn-test-lm"),
                         [](const auto& info) { return info.param == "stories260K" ? "stories260K" : "kvarn_test_lm"; });

TEST(Tokenizer, SpecialTokensAreMatchedBeforeBpe) {
  const auto tok = Tokenizer::load(tokenizer_path("kvarn-test-lm"));
  const auto ids = tok.encode("<|im_start|>user");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], *tok.token_id("<|im_start|>"));
  EXPECT_TRUE(tok.is_special(ids[0]));
  EXPECT_GT(tok.encode("<|im_start|>", false).size(), 1u);  // as plain text when not parsing specials
  EXPECT_EQ(tok.decode(ids, true), "user");
}

TEST(Tokenizer, RoundTripsRealTextQuickly) {
  const auto tok = Tokenizer::load(tokenizer_path("kvarn-test-lm"));
  std::ifstream in(test::shared_dir() / "data/eval.txt");
  std::string text(200000, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  text = text.substr(0, text.rfind('\n') + 1);  // whole lines: no character cut in half
  const auto start = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("encoded %zu bytes into %zu tokens in %.3f s (%.1f MB/s)\n", text.size(), ids.size(), seconds,
              text.size() / seconds / 1e6);
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(IncrementalDetokenizer, NeverSplitsACharacterAndConcatenatesToDecode) {
  for (const std::string model : {"stories260K", "kvarn-test-lm"}) {
    const auto tok = Tokenizer::load(tokenizer_path(model));
    const std::string text = "Emoji 👩‍👩‍👧 and 日本語 text, café.";
    const auto ids = tok.encode(text);
    IncrementalDetokenizer stream(tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string piece = stream.push(id);
      EXPECT_EQ(piece.find("\xef\xbf\xbd"), std::string::npos) << model << ": a partial character was emitted";
      streamed += piece;
    }
    streamed += stream.finish();
    EXPECT_EQ(streamed, tok.decode(ids)) << model;
  }
}

TEST(Tokenizer, MalformedFilesNameWhatIsWrong) {
  const std::pair<std::string, std::string> cases[] = {
      {"{", "invalid JSON"},
      {R"({"model": {"type": "Unigram", "vocab": {}}})", "model.type 'Unigram' is not supported"},
      {R"({"model": {"type": "BPE"}})", "missing object model.vocab"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "model.merges[0]"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "NFKD"}})",
       "normalizer type 'NFKD' is not supported"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split", "behavior": "Isolated",
          "pattern": {"Regex": "(unclosed"}}})", "regex does not compile"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}})",
       "decoder type 'WordPiece' is not supported"},
  };
  for (const auto& [json, expected] : cases) {
    try {
      Tokenizer::parse(json, "bad/tokenizer.json");
      ADD_FAILURE() << "accepted: " << json;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("bad/tokenizer.json"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
}

}  // namespace
}  // namespace kvarn::tokenizer
