// evaluate(): its perplexity agrees with an independent computation from transformers' golden logits, the fp16
// reference scores KL 0 and full top-1 agreement against itself, and a lossier cache shows a larger KL.
#include "engine/evaluate.h"

#include "shared_dir.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

namespace kvarn::engine {
namespace {

const auto kStories = test::shared_dir() / "models/stories260K";

TEST(Evaluate, PerplexityMatchesGoldenLogits) {
  std::ifstream in(test::shared_dir() / "golden/stories260K/golden_logits.jsonl");
  int checked = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    const auto ids = j["input_ids"].get<std::vector<int32_t>>();
    // Golden NLL of each next token: logsumexp - its logit, where it is among the golden top-20.
    double golden = 0;
    bool complete = true;
    for (size_t pos = 0; pos + 1 < ids.size(); ++pos) {
      const auto top = j["top_ids"][pos].get<std::vector<int32_t>>();
      const auto k = std::find(top.begin(), top.end(), ids[pos + 1]) - top.begin();
      if (k == static_cast<ptrdiff_t>(top.size())) complete = false;
      else golden += j["logsumexp"][pos].get<double>() - j["top_logits"][pos][k].get<double>();
    }
    if (!complete) continue;
    // One window holding exactly this prompt: BOS + ids[1..]; a window's last stream token is never fed (the
    // protocol of ppl.json), so one filler token completes the window.
    std::vector<int32_t> stream(ids.begin() + 1, ids.end());
    stream.push_back(ids.back());
    const auto scores = evaluate(kStories, stream, ids[0], {"fp32"}, {.ctx = static_cast<int>(ids.size()), .threads = 2});
    ASSERT_EQ(scores[0].tokens, static_cast<int64_t>(ids.size()) - 1);
    EXPECT_NEAR(scores[0].nll, golden, 1e-3 * scores[0].tokens) << j["prompt"];
    ++checked;
  }
  EXPECT_GE(checked, 1);
}

TEST(Evaluate, Fp16AgainstItselfIsExactAndQuantizationShows) {
  std::vector<int32_t> stream;
  std::ifstream ids_file(kStories / "greedy_ids_from_bos.txt");
  for (int32_t id; ids_file >> id;) stream.push_back(id);
  stream.erase(stream.begin());  // the BOS
  const auto scores = evaluate(kStories, stream, 1, {"fp16", "fp32", "kvarn_k4v2_g64"},
                               {.ctx = 256, .gen = 1, .gen_len = 200, .threads = 2});
  EXPECT_EQ(scores[0].kl, 0.0);
  EXPECT_EQ(scores[0].top1(), 1.0);
  EXPECT_EQ(scores[0].identical, 1);
  EXPECT_LT(scores[1].mean_kl(), 1e-4);
  EXPECT_GT(scores[2].mean_kl(), 10 * scores[1].mean_kl());  // 64-token tiles flushed: 2-bit values show
  EXPECT_GT(scores[2].tokens, 0);
}

TEST(Evaluate, RefusesWindowsLongerThanTheModel) {
  const std::vector<int32_t> stream(2000, 5);
  EXPECT_ANY_THROW(evaluate(kStories, stream, 1, {"fp16"}, {.ctx = 1024}));
  EXPECT_ANY_THROW(evaluate(kStories, std::vector<int32_t>(10, 5), 1, {"fp16"}, {.ctx = 64}));
}

}  // namespace
}  // namespace kvarn::engine
