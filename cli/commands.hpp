// The subcommands of `moe`. Each registers itself on the top-level app; its callback runs
// the command and stores the process exit status in `status`. Errors are thrown: InputError
// and moe::Error mean bad input (status 2), anything else a failure (status 1).
#pragma once
#include <string>

#include <CLI/CLI.hpp>

namespace moe::cli {

void add_gate_command(CLI::App& app, int& status);
void add_route_command(CLI::App& app, int& status);
void add_train_command(CLI::App& app, int& status);
void add_bench_command(CLI::App& app, int& status);  // cmd_bench.cpp (bench helper)
void add_inspect_command(CLI::App& app, int& status);  // cmd_inspect.cpp: model folders

// The work of `moe gate` / `moe route` without the process around it: JSON text in, the
// output document's text out (no trailing newline). Bad input throws InputError or
// moe::Error, exactly as the command reports it. The fuzzers call these.
std::string run_gate_json(const std::string& text);
std::string run_route_json(const std::string& text);

}  // namespace moe::cli
