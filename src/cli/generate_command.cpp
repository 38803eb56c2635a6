// kvarn generate: a model folder and a prompt in, streamed text out, through the paged (KVarN) cache on the CPU.
#include "cli/commands.h"
#include "engine/generate.h"
#include "util/error.h"

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cstdio>

namespace kvarn::cli {

namespace {

struct GenerateOptions {
  std::string model_dir, prompt, prompt_ids;
  engine::RuntimeOptions runtime;
  engine::SamplingParams sampling;
  uint64_t seed = 0;
  bool json = false;
};

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string item = text.substr(at, comma - at);
    try {
      size_t used = 0;
      ids.push_back(std::stoi(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw Error("--prompt-ids: '{}' is not a token id; expected comma-separated integers like 1,2,3", item);
    }
    at = comma + 1;
  }
  return ids;
}

void run_generate(GenerateOptions& o) {
  if (o.prompt.empty() == o.prompt_ids.empty()) throw Error("generate: give exactly one of -p/--prompt or --prompt-ids");
  o.sampling.validate();
  engine::Runtime rt(o.model_dir, o.runtime);
  const auto tok = tokenizer::Tokenizer::load(std::filesystem::path(o.model_dir) / "tokenizer.json");
  std::vector<int32_t> prompt;
  if (o.prompt_ids.empty()) {
    // Like the golden runs: BOS first (the model's bos_token_id), then the text.
    if (rt.config().bos_token_id) prompt.push_back(*rt.config().bos_token_id);
    const auto ids = tok.encode(o.prompt);
    prompt.insert(prompt.end(), ids.begin(), ids.end());
  } else {
    prompt = parse_ids(o.prompt_ids);
  }
  for (int32_t id : prompt)
    if (id < 0 || id >= rt.config().vocab_size)
      throw Error("--prompt-ids: token id {} is outside the vocabulary (0..{})", id, rt.config().vocab_size - 1);

  const auto result = engine::generate(rt, tok, prompt, o.sampling, [&](std::string_view text) {
    if (!o.json) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (o.json) {
    fmt::print("{}\n", nlohmann::json{{"prompt_ids", prompt},
                                      {"output_ids", result.output_ids},
                                      {"text", result.text},
                                      {"finish_reason", result.finish_reason}}
                           .dump());
  } else {
    fmt::print("\n");
  }
  const double decode_tokens = static_cast<double>(result.output_ids.size());
  fmt::print(stderr, "prompt: {} tokens, {:.1f} tokens/s | decode: {} tokens, {:.1f} tokens/s | KV blocks used: {} ({})\n",
             prompt.size(), prompt.size() / std::max(result.prefill_seconds, 1e-9), result.output_ids.size(),
             decode_tokens / std::max(result.decode_seconds, 1e-9), result.kv_blocks_used,
             rt.cache().shape().dtype.name);
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt with a Hugging Face model folder");
  cmd->add_option("model", o->model_dir, "Model folder (config.json, *.safetensors, tokenizer.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-p,--prompt", o->prompt, "Prompt text (BOS is prepended)");
  cmd->add_option("--prompt-ids", o->prompt_ids, "Prompt as comma-separated token ids, used as given");
  cmd->add_option("--max-tokens", o->sampling.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", o->sampling.temperature, "0 is greedy")->capture_default_str();
  cmd->add_option("--top-p", o->sampling.top_p)->capture_default_str();
  cmd->add_option("--top-k", o->sampling.top_k, "-1: off")->capture_default_str();
  cmd->add_option("--min-p", o->sampling.min_p)->capture_default_str();
  cmd->add_option("--seed", o->sampling.seed, "Same seed, same output");
  cmd->add_option("--stop", o->sampling.stop, "Stop string (repeatable; not included in the output)");
  cmd->add_flag("--ignore-eos", o->sampling.ignore_eos, "Keep generating past end-of-sequence tokens");
  cmd->add_option("--kv-cache-dtype", o->runtime.kv_cache_dtype, "KV cache dtype")->capture_default_str();
  cmd->add_option("--block-size", o->runtime.block_size, "Tokens per KV block (default: the dtype's tile size)");
  cmd->add_option("--max-model-len", o->runtime.max_model_len, "Context limit (default: the model's)");
  cmd->add_option("--threads", o->runtime.threads, "CPU threads (default: all)");
  cmd->add_flag("--json", o->json, "Print prompt ids, output ids and text as one JSON object");
  cmd->callback([o] { run_generate(*o); });
}

}  // namespace kvarn::cli
