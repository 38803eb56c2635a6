// kvarn capacity: tokens of KV history that fit a memory budget, per cache dtype, and the ratio to fp16.
#include "cache/capacity.h"
#include "cli/commands.h"
#include "model/config.h"
#include "util/error.h"

#include <fmt/core.h>
#include <nlohmann/json.hpp>

namespace kvarn::cli {

namespace {

struct CapacityOptions {
  std::string shape, model_dir;
  double memory_gb = 0;
  int max_num_seqs = 256, max_model_len = 0, block_size = 0;
  bool json = false;
};

void run_capacity(const CapacityOptions& o) {
  if (o.shape.empty() == o.model_dir.empty()) throw Error("capacity: give exactly one of --shape or --model");
  if (o.block_size < 0) throw Error("--block-size {}: expected a positive number of tokens", o.block_size);
  if (o.max_model_len < 0) throw Error("--max-model-len {}: expected a positive number of tokens", o.max_model_len);
  const auto config = o.shape.empty() ? model::load_config(o.model_dir) : model::shape_preset(o.shape);
  cache::CapacityQuery q{config.num_hidden_layers, config.num_key_value_heads, config.head_dim, o.memory_gb * 1e9,
                         o.max_num_seqs, o.max_model_len > 0 ? o.max_model_len : config.max_position_embeddings,
                         o.block_size};
  const auto fp16 = cache::plan_capacity(q, codec::parse_cache_dtype("fp16"));
  nlohmann::json rows = nlohmann::json::array();
  if (!o.json) {
    fmt::print("{}: {} layers x {} kv-heads x head_dim {}; {:g} GB; {} tail slots (--max-num-seqs); "
               "concurrency at {} tokens\n\n",
               o.shape.empty() ? o.model_dir : o.shape, q.num_layers, q.num_kv_heads, q.head_dim, o.memory_gb,
               q.max_num_seqs, q.max_model_len);
    fmt::print("| cache dtype | block | bytes/token | tails (MiB) | tokens that fit | vs fp16 | seqs at max len |\n");
    fmt::print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  }
  for (const auto& name : codec::cache_dtype_names()) {
    const auto dtype = codec::parse_cache_dtype(name);
    if (dtype.tile_tokens != 0 && o.block_size != 0 && o.block_size != dtype.tile_tokens) continue;  // other G
    const auto c = cache::plan_capacity(q, dtype);
    const double ratio = static_cast<double>(c.tokens) / fp16.tokens;
    if (o.json) {
      rows.push_back({{"dtype", name}, {"block_size", c.block_size}, {"bytes_per_token", c.bytes_per_token},
                      {"tail_bytes", c.tail_bytes}, {"tokens", c.tokens}, {"ratio_vs_fp16", ratio},
                      {"seqs_at_max_model_len", c.seqs_at_max_len}});
    } else {
      fmt::print("| {} | {} | {:.0f} | {:.0f} | {} | {:.2f}x | {} |\n", name, c.block_size, c.bytes_per_token,
                 c.tail_bytes / 1048576.0, c.tokens, ratio, c.seqs_at_max_len);
    }
  }
  if (o.json) fmt::print("{}\n", rows.dump(2));
}

}  // namespace

void add_capacity_command(CLI::App& app) {
  auto options = std::make_shared<CapacityOptions>();
  auto* cmd = app.add_subcommand(
      "capacity",
      "Tokens of KV history that fit a memory budget per cache dtype. A block holds G tokens of every kv-head of one "
      "layer (tile bytes incl. scales); each of --max-num-seqs sequences also reserves one fp16 tail slot of G tokens "
      "(none for fp16/fp32, whose partial block is written in place). tokens = floor((budget - tails) / block bytes "
      "x layers) x G.");
  cmd->add_option("--shape", options->shape, "A well-known model shape")
      ->check(CLI::IsMember(model::shape_preset_names()));
  cmd->add_option("--model", options->model_dir, "A Hugging Face model folder (reads config.json)");
  cmd->add_option("--memory-gb", options->memory_gb, "KV cache memory budget in GB (1e9 bytes)")
      ->required();
  cmd->add_option("--max-num-seqs", options->max_num_seqs, "Running sequences (tail slots reserved)")
      ->capture_default_str();
  cmd->add_option("--max-model-len", options->max_model_len,
                  "Context length for the concurrency column (default: max_position_embeddings)");
  cmd->add_option("--block-size", options->block_size, "Tokens per block (default: the dtype's tile size, or 128)");
  cmd->add_flag("--json", options->json, "Print JSON instead of a table");
  cmd->callback([options] { run_capacity(*options); });
}

}  // namespace kvarn::cli
