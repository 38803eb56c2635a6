// kvarn: the command-line entry point. Usage errors exit with 2, runtime errors with 1.
#include "cli/commands.h"
#include "util/error.h"

#include <fmt/core.h>

int main(int argc, char** argv) {
  CLI::App app{"kvarn: LLM inference with a KVarN-quantized KV cache"};
  app.set_version_flag("--version", "kvarn 0.1.0");
  app.require_subcommand(1);
  kvarn::cli::add_capacity_command(app);
  kvarn::cli::add_codec_eval_command(app);
  kvarn::cli::add_generate_command(app);
  kvarn::cli::add_eval_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help and --version exit 0
  } catch (const std::exception& e) {  // kvarn::Error, and anything a library let through
    fmt::print(stderr, "kvarn: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
