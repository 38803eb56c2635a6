// kvarn codec-eval: per cache dtype, the relative error of decoded keys and values and of the attention output,
// on real captured K/V (../shared/golden/*/kv_capture.safetensors) and on synthetic K/V with outlier channels and
// attention sinks.
#include "cli/commands.h"
#include "codec/codec_error.h"
#include "codec/synthetic_kv.h"
#include "model/safetensors.h"
#include "util/error.h"
#include "util/thread_pool.h"

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <map>

namespace kvarn::cli {

namespace {

struct CodecEvalOptions {
  std::vector<std::string> captures;
  bool synthetic = false;
  std::string dtype = "all";
  int threads = 0;
  bool json = false;
};

// One head's history: [tokens][head_dim] keys and values in the model space.
struct HeadKv {
  std::vector<float> keys, values;
  int tokens, head_dim;
};

// Capture layout (golden/README.md): tensors layerN.k / layerN.v of shape [kv_heads, tokens, head_dim].
std::vector<HeadKv> capture_heads(const std::string& path) {
  const auto file = model::SafetensorsFile::open(path);
  std::vector<HeadKv> heads;
  for (const auto& name : file.names()) {
    if (name.size() < 2 || name.substr(name.size() - 2) != ".k") continue;
    const auto k = file.tensor(name), v = file.tensor(name.substr(0, name.size() - 1) + "v");
    if (k.shape.size() != 3 || k.shape != v.shape)
      throw Error("{}: '{}' and its values must both be [kv_heads, tokens, head_dim]", path, name);
    const auto kf = k.to_float(), vf = v.to_float();
    const int n_heads = static_cast<int>(k.shape[0]), tokens = static_cast<int>(k.shape[1]),
              d = static_cast<int>(k.shape[2]);
    const size_t per_head = static_cast<size_t>(tokens) * d;
    for (int h = 0; h < n_heads; ++h)
      heads.push_back({std::vector<float>(kf.begin() + h * per_head, kf.begin() + (h + 1) * per_head),
                       std::vector<float>(vf.begin() + h * per_head, vf.begin() + (h + 1) * per_head), tokens, d});
  }
  if (heads.empty()) throw Error("{}: no 'layerN.k' tensors found", path);
  return heads;
}

std::vector<HeadKv> synthetic_heads() {
  std::vector<HeadKv> heads;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    auto kv = codec::synthetic_kv({.tokens = 2048, .head_dim = 128, .seed = seed});
    heads.push_back({std::move(kv.keys), std::move(kv.values), 2048, 128});
  }
  return heads;
}

void report(const std::string& source, const std::vector<HeadKv>& heads, const std::vector<std::string>& dtypes,
            ThreadPool& pool, nlohmann::json& json_out, bool json) {
  std::vector<codec::CodecError> totals(dtypes.size());
  std::vector<std::vector<codec::CodecError>> parts(dtypes.size(), std::vector<codec::CodecError>(heads.size()));
  pool.parallel_for(dtypes.size() * heads.size(), [&](size_t begin, size_t end) {
    for (size_t job = begin; job < end; ++job) {
      const size_t i = job / heads.size(), h = job % heads.size();
      const auto dtype = codec::parse_cache_dtype(dtypes[i]);
      const codec::TileCodec codec(dtype, heads[h].head_dim, codec::resolve_block_size(dtype, 0));
      parts[i][h] = codec::measure_codec_error(codec, heads[h].keys, heads[h].values, heads[h].tokens);
    }
  });
  for (size_t i = 0; i < dtypes.size(); ++i)
    for (const auto& part : parts[i]) totals[i] += part;
  if (!json) {
    fmt::print("\n{} ({} heads x {} tokens, last {} held out as queries)\n\n", source, heads.size(), heads[0].tokens,
               codec::kHeldOutTokens);
    fmt::print("| cache dtype | K rel. error | V rel. error | attention output rel. error |\n| --- | ---: | ---: | ---: |\n");
  }
  for (size_t i = 0; i < dtypes.size(); ++i) {
    if (json)
      json_out[source][dtypes[i]] = {
          {"key", totals[i].key()}, {"value", totals[i].value()}, {"attention_output", totals[i].output()}};
    else
      fmt::print("| {} | {:.4f} | {:.4f} | {:.4f} |\n", dtypes[i], totals[i].key(), totals[i].value(),
                 totals[i].output());
  }
}

void run_codec_eval(const CodecEvalOptions& o) {
  if (o.captures.empty() && !o.synthetic) throw Error("codec-eval: give --capture FILE and/or --synthetic");
  const auto dtypes = o.dtype == "all" ? codec::cache_dtype_names()
                                       : std::vector<std::string>{codec::parse_cache_dtype(o.dtype).name};
  ThreadPool pool(o.threads);
  nlohmann::json json_out;
  for (const auto& path : o.captures) report(path, capture_heads(path), dtypes, pool, json_out, o.json);
  if (o.synthetic) report("synthetic (4 outlier key channels 10-30x, sink token 50-100x)", synthetic_heads(), dtypes, pool,
                          json_out, o.json);
  if (o.json) fmt::print("{}\n", json_out.dump(2));
}

}  // namespace

void add_codec_eval_command(CLI::App& app) {
  auto options = std::make_shared<CodecEvalOptions>();
  auto* cmd = app.add_subcommand("codec-eval", "Error of each cache dtype on real and synthetic K/V");
  cmd->add_option("--capture", options->captures, "kv_capture.safetensors file(s): layerN.k/.v [kv_heads, tokens, D]")
      ->check(CLI::ExistingFile);
  cmd->add_flag("--synthetic", options->synthetic, "Also evaluate synthetic K/V with outlier channels and sinks");
  cmd->add_option("--kv-cache-dtype", options->dtype, "A cache dtype, or all")->capture_default_str();
  cmd->add_option("--threads", options->threads, "Worker threads (default: all)");
  cmd->add_flag("--json", options->json, "Print JSON instead of tables");
  cmd->callback([options] { run_codec_eval(*options); });
}

}  // namespace kvarn::cli
