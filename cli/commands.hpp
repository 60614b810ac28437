// The subcommands of `moe`. Each registers itself on the top-level app; its callback runs
// the command and stores the process exit status in `status`. Errors are thrown: InputError
// and moe::Error mean bad input (status 2), anything else a failure (status 1).
#pragma once
#include <CLI/CLI.hpp>

namespace moe::cli {

void add_gate_command(CLI::App& app, int& status);
void add_route_command(CLI::App& app, int& status);
void add_train_command(CLI::App& app, int& status);
void add_bench_command(CLI::App& app, int& status);  // cmd_bench.cpp (bench helper)

}  // namespace moe::cli
