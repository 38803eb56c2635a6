#pragma once
// The accuracy instrument: how much a cache dtype changes what the model predicts, against fp16 on the same text.
// Protocol of ../shared/golden/*/ppl.json: the token stream is cut into non-overlapping windows of ctx tokens;
// each window is fed as [BOS] + its first ctx - 1 tokens and every next token is scored. Windows are fed in chunks
// of one block, so every token attends to flushed tiles exactly as in decode.
#include "engine/runtime.h"

#include <cmath>
#include <string>
#include <vector>

namespace kvarn::engine {

struct DtypeScore {
  std::string dtype;
  double nll = 0;          // summed negative log-likelihood of the scored tokens
  double kl = 0;           // summed KL(p_fp16 || p_dtype)
  int64_t top1_agree = 0;  // positions whose argmax equals fp16's
  int64_t tokens = 0;
  // Long-generation drift against fp16.
  double first_divergence = 0;  // mean tokens until the first differing greedy token
  int identical = 0;            // continuations identical to fp16's
  int continuations = 0;

  double perplexity() const { return std::exp(nll / tokens); }
  double mean_kl() const { return kl / tokens; }
  double top1() const { return static_cast<double>(top1_agree) / tokens; }
};

struct EvalOptions {
  int ctx = 2048;
  int max_windows = 0;  // 0: all
  int gen = 0;          // greedy continuations to compare
  int gen_len = 1024;
  int threads = 0;
};

// Scores every dtype (fp16 included, as its own reference) on the token stream. bos: prepended to each window.
std::vector<DtypeScore> evaluate(const std::filesystem::path& model_dir, std::span<const int32_t> tokens, int32_t bos,
                                 const std::vector<std::string>& dtypes, const EvalOptions& options);

}  // namespace kvarn::engine
