// generate(): streams exactly the returned text, stops at stop strings (excluded from the text, even when they
// span tokens), at max_tokens ("length") and at stop tokens ("stop"), refuses prompts that fill the context, and
// returns every KV block to the pool.
#include "engine/generate.h"

#include "shared_dir.h"

#include <gtest/gtest.h>

namespace kvarn::engine {
namespace {

struct Stories {
  Runtime rt{test::shared_dir() / "models/stories260K", {.kv_cache_dtype = "kvarn_k4v2_g64", .threads = 2}};
  tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(test::shared_dir() / "models/stories260K/tokenizer.json");
  std::vector<int32_t> bos{1};

  GenerationResult run(const SamplingParams& params, std::string* streamed) {
    return generate(rt, tok, bos, params, [&](std::string_view piece) { *streamed += piece; });
  }
};

TEST(Generate, StreamsTheReturnedTextAndStopsAtLength) {
  Stories s;
  std::string streamed;
  const auto r = s.run({.temperature = 0, .max_tokens = 150}, &streamed);
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_EQ(r.output_ids.size(), 150u);
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.text, s.tok.decode(r.output_ids, true));
  EXPECT_EQ(r.kv_blocks_used, 2);  // 151 tokens in 64-token tiles: two flushed
  EXPECT_EQ(s.rt.cache().free_blocks(), s.rt.cache().shape().num_blocks);
}

TEST(Generate, StopStringsEndTheTextBeforeThem) {
  Stories s;
  std::string full, streamed;
  const auto reference = s.run({.temperature = 0, .max_tokens = 60}, &full);
  const std::string stop = "little girl";  // greedy from BOS: "Once upon a time, there was a little girl named Lily"
  ASSERT_NE(full.find(stop), std::string::npos);
  const auto r = s.run({.temperature = 0, .max_tokens = 60, .stop = {stop}}, &streamed);
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_EQ(r.text, full.substr(0, full.find(stop)));
  EXPECT_EQ(streamed, r.text);
}

TEST(Generate, StopTokensEndGenerationAndLongPromptsAreRefused) {
  Stories s;
  std::string streamed;
  const auto greedy = s.run({.temperature = 0, .max_tokens = 40}, &streamed);
  // Make the 10th greedy token an extra stop token: generation ends before it.
  const auto r = s.run({.temperature = 0, .max_tokens = 40, .stop_token_ids = {greedy.output_ids[9]}}, &streamed);
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_LE(r.output_ids.size(), 9u);
  EXPECT_THROW(generate(s.rt, s.tok, std::vector<int32_t>(512, 1), {}, [](std::string_view) {}), std::exception);
}

}  // namespace
}  // namespace kvarn::engine
