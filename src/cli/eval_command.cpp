// kvarn eval: perplexity, KL divergence and top-1 agreement against fp16, and greedy drift, of every cache dtype on
// a text file (see engine/evaluate.h for the protocol).
#include "cli/commands.h"
#include "engine/evaluate.h"
#include "model/config.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

namespace kvarn::cli {

namespace {

struct EvalCommandOptions {
  std::string model_dir, text_file, dtype = "all", json_file;
  engine::EvalOptions eval;
};

void run_eval(const EvalCommandOptions& o) {
  const auto config = model::load_config(o.model_dir);
  if (!config.bos_token_id) throw Error("{}: the model has no bos_token_id to start each window with", o.model_dir);
  std::ifstream in(o.text_file);
  if (!in) throw Error("--text {}: cannot open", o.text_file);
  std::stringstream text;
  text << in.rdbuf();
  const auto tokens = tokenizer::Tokenizer::load(std::filesystem::path(o.model_dir) / "tokenizer.json").encode(text.str());
  std::vector<std::string> dtypes;
  if (o.dtype == "all") {
    dtypes = codec::cache_dtype_names();
  } else {
    dtypes = {"fp16", codec::parse_cache_dtype(o.dtype).name};
    if (dtypes[1] == "fp16") dtypes.pop_back();
  }
  const auto scores = engine::evaluate(o.model_dir, tokens, *config.bos_token_id, dtypes, o.eval);
  const double fp16_ppl = std::find_if(scores.begin(), scores.end(), [](auto& s) { return s.dtype == "fp16"; })
                              ->perplexity();
  fmt::print("{}: {} tokens of {}, {} scored in windows of {} (BOS + {}), chunks of one block; {} greedy "
             "continuations of up to {} tokens\n\n",
             o.model_dir, tokens.size(), o.text_file, scores[0].tokens, o.eval.ctx, o.eval.ctx - 1,
             scores[0].continuations, o.eval.gen_len);
  fmt::print("| cache dtype | perplexity | vs fp16 | mean KL(fp16 ‖ dtype) | top-1 agreement | first divergence "
             "(tokens) | identical continuations |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  nlohmann::json json = nlohmann::json::array();
  for (const auto& s : scores) {
    fmt::print("| {} | {:.4f} | {:+.2f}% | {:.5f} | {:.2f}% | {:.1f} | {}/{} |\n", s.dtype, s.perplexity(),
               100 * (s.perplexity() / fp16_ppl - 1), s.mean_kl(), 100 * s.top1(), s.first_divergence, s.identical,
               s.continuations);
    json.push_back({{"dtype", s.dtype}, {"perplexity", s.perplexity()}, {"mean_kl", s.mean_kl()},
                    {"top1_agreement", s.top1()}, {"tokens", s.tokens}, {"first_divergence", s.first_divergence},
                    {"identical_continuations", s.identical}, {"continuations", s.continuations}});
  }
  if (!o.json_file.empty()) {
    std::ofstream out(o.json_file);
    if (!out) throw Error("--json {}: cannot write", o.json_file);
    out << json.dump(2) << "\n";
  }
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto o = std::make_shared<EvalCommandOptions>();
  auto* cmd = app.add_subcommand("eval", "Accuracy of cache dtypes against fp16 on a text file");
  cmd->add_option("model", o->model_dir, "Model folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--text", o->text_file, "Evaluation text")->required();
  cmd->add_option("--kv-cache-dtype", o->dtype, "A cache dtype, or all")->capture_default_str();
  cmd->add_option("--ctx", o->eval.ctx, "Window length in tokens, BOS included")->capture_default_str();
  cmd->add_option("--max-windows", o->eval.max_windows, "Evaluate only the first N windows (0: all)");
  cmd->add_option("--gen", o->eval.gen, "Greedy continuations compared with fp16")->capture_default_str();
  cmd->add_option("--gen-len", o->eval.gen_len, "Tokens per continuation (capped by the context)")
      ->capture_default_str();
  cmd->add_option("--threads", o->eval.threads, "CPU threads (default: all)");
  cmd->add_option("--json", o->json_file, "Also write the results as JSON to this file");
  cmd->callback([o] { run_eval(*o); });
}

}  // namespace kvarn::cli
