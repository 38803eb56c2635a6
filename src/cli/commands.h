#pragma once
// The subcommands of the `kvarn` executable; each adds itself to the app and runs when chosen.
#include <CLI/CLI.hpp>

namespace kvarn::cli {

void add_capacity_command(CLI::App& app);
void add_codec_eval_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_eval_command(CLI::App& app);

}  // namespace kvarn::cli
