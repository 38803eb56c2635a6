#include "engine/evaluate.h"

#include "engine/generate.h"
#include "util/error.h"

#include <algorithm>
#include <cmath>

namespace kvarn::engine {

namespace {

// Row-wise log-softmax of logits [rows][vocab], in double.
std::vector<double> log_softmax(const std::vector<float>& logits, size_t vocab) {
  std::vector<double> out(logits.size());
  for (size_t r = 0; r < logits.size() / vocab; ++r) {
    const float* row = logits.data() + r * vocab;
    const double max = *std::max_element(row, row + vocab);
    double sum = 0;
    for (size_t i = 0; i < vocab; ++i) sum += std::exp(row[i] - max);
    const double log_z = max + std::log(sum);
    for (size_t i = 0; i < vocab; ++i) out[r * vocab + i] = row[i] - log_z;
  }
  return out;
}

std::vector<double> window_log_probs(Runtime& rt, std::span<const int32_t> input) {
  const int seq = rt.cache().add_sequence();
  const auto logits = prefill(rt, seq, input, true);
  rt.cache().free_sequence(seq);
  return log_softmax(logits, rt.config().vocab_size);
}

}  // namespace

std::vector<DtypeScore> evaluate(const std::filesystem::path& model_dir, std::span<const int32_t> tokens, int32_t bos,
                                 const std::vector<std::string>& dtypes, const EvalOptions& o) {
  if (o.ctx < 2) throw Error("--ctx {}: expected at least 2 tokens", o.ctx);
  auto runtime = [&](const std::string& dtype) {
    return std::make_unique<Runtime>(model_dir, RuntimeOptions{.kv_cache_dtype = dtype, .threads = o.threads});
  };
  auto reference = runtime("fp16");
  if (o.ctx > reference->max_model_len())
    throw Error("--ctx {} exceeds the model's context of {} tokens", o.ctx, reference->max_model_len());
  const int64_t available = static_cast<int64_t>(tokens.size()) / o.ctx;
  if (available == 0) throw Error("the text has {} tokens, fewer than one window of --ctx {}", tokens.size(), o.ctx);
  const int64_t windows = o.max_windows > 0 ? std::min<int64_t>(o.max_windows, available) : available;
  std::vector<std::unique_ptr<Runtime>> runtimes;
  std::vector<DtypeScore> scores;
  for (const auto& d : dtypes) {
    runtimes.push_back(d == "fp16" ? nullptr : runtime(d));
    scores.push_back({.dtype = runtimes.back() ? runtimes.back()->cache().shape().dtype.name : "fp16"});
  }
  const size_t vocab = reference->config().vocab_size;

  for (int64_t w = 0; w < windows; ++w) {
    std::vector<int32_t> input{bos};
    input.insert(input.end(), tokens.begin() + w * o.ctx, tokens.begin() + w * o.ctx + o.ctx - 1);
    const auto ref = window_log_probs(*reference, input);
    for (size_t d = 0; d < dtypes.size(); ++d) {
      const auto lp = runtimes[d] ? window_log_probs(*runtimes[d], input) : ref;
      for (size_t pos = 0; pos + 1 < input.size(); ++pos) {
        const double* p = lp.data() + pos * vocab;
        const double* q = ref.data() + pos * vocab;
        scores[d].nll -= p[input[pos + 1]];
        double kl = 0;
        for (size_t i = 0; i < vocab; ++i) kl += std::exp(q[i]) * (q[i] - p[i]);
        scores[d].kl += kl;
        scores[d].top1_agree += std::max_element(p, p + vocab) - p == std::max_element(q, q + vocab) - q;
        ++scores[d].tokens;
      }
    }
  }
  for (int g = 0; g < o.gen && g < windows; ++g) {  // prompt: BOS + the first 32 tokens of window g
    std::vector<int32_t> prompt{bos};
    prompt.insert(prompt.end(), tokens.begin() + g * o.ctx, tokens.begin() + g * o.ctx + std::min(32, o.ctx - 1));
    const int len = std::min(o.gen_len, reference->max_model_len() - static_cast<int>(prompt.size()));
    const auto ref = greedy_continuation(*reference, prompt, len);
    for (size_t d = 0; d < dtypes.size(); ++d) {
      const auto out = runtimes[d] ? greedy_continuation(*runtimes[d], prompt, len) : ref;
      const auto diverge = std::mismatch(ref.begin(), ref.end(), out.begin()).first - ref.begin();
      scores[d].first_divergence += static_cast<double>(diverge);
      scores[d].identical += diverge == static_cast<ptrdiff_t>(ref.size());
      ++scores[d].continuations;
    }
  }
  for (auto& s : scores)
    if (s.continuations) s.first_divergence /= s.continuations;
  return scores;
}

}  // namespace kvarn::engine
