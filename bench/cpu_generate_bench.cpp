// CPU end-to-end throughput: prompt (prefill) and decode tokens/s of a model folder at given contexts, thread
// counts and cache dtypes, measured side by side in one run. Prompts are real text (../shared/data/eval.txt).
// Usage: cpu_generate_bench MODEL_DIR TEXT_FILE [--contexts 512,2048] [--threads 1,2]
//        [--dtypes fp16,kvarn_k4v2_g128] [--decode 32]
// For context C: prefill C - decode tokens, then decode `decode` tokens, so the last token sees C tokens.
#include "engine/generate.h"
#include "engine/runtime.h"
#include "tokenizer/tokenizer.h"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <chrono>
#include <fstream>
#include <sstream>

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvarn CPU prompt/decode throughput"};
  std::string model_dir, text_file;
  std::vector<int> contexts = {512, 2048}, threads = {1, 2};
  std::vector<std::string> dtypes = {"fp16", "kvarn_k4v2_g128"};
  int decode = 32;
  app.add_option("model", model_dir)->required();
  app.add_option("text", text_file)->required();
  app.add_option("--contexts", contexts)->delimiter(',');
  app.add_option("--threads", threads)->delimiter(',');
  app.add_option("--dtypes", dtypes)->delimiter(',');
  app.add_option("--decode", decode);
  CLI11_PARSE(app, argc, argv);

  const auto tok = kvarn::tokenizer::Tokenizer::load(std::filesystem::path(model_dir) / "tokenizer.json");
  std::ifstream in(text_file);
  std::stringstream text;
  text << in.rdbuf();
  const auto ids = tok.encode(text.str().substr(0, 200000));

  fmt::print("| threads | context | cache dtype | prompt tokens/s | decode tokens/s |\n| ---: | ---: | --- | ---: | ---: |\n");
  for (int t : threads)
    for (int context : contexts)
      for (const auto& dtype : dtypes) {
        kvarn::engine::Runtime rt(model_dir, {.kv_cache_dtype = dtype, .threads = t, .max_model_len = context});
        const int seq = rt.cache().add_sequence();
        const std::span<const int32_t> prompt(ids.data(), context - decode);
        const auto t0 = Clock::now();
        kvarn::engine::prefill(rt, seq, prompt);
        const double prefill_s = since(t0);
        const auto t1 = Clock::now();
        for (int i = 0; i < decode; ++i) {
          const kvarn::engine::StepWork work{seq, std::span(&ids[context - decode + i], 1), false};
          rt.runner().execute(std::span(&work, 1));
        }
        const double decode_s = since(t1);
        rt.cache().free_sequence(seq);
        fmt::print("| {} | {} | {} | {:.0f} | {:.1f} |\n", t, context, dtype, prompt.size() / prefill_s,
                   decode / decode_s);
      }
  return 0;
}
