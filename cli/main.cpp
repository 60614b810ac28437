// `moe`: the command-line face of libmoe. Subcommands live one per file (cmd_*.cpp).
//
// Exit status: 0 success, 2 bad input (usage errors, invalid JSON, fields of the wrong type
// or shape, library validation errors), 1 any other failure. Errors are one line on stderr;
// a command builds its whole output before printing, so a failure leaves stdout empty.
#include <exception>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "commands.hpp"
#include "json_input.hpp"
#include "moe/error.hpp"

namespace {

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"libmoe: Mixture-of-Experts layers — routing, training, benchmarks", "moe"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moe 0.1.0");
  int status = 0;
  moe::cli::add_gate_command(app, status);
  moe::cli::add_route_command(app, status);
  moe::cli::add_train_command(app, status);
  moe::cli::add_bench_command(app, status);
  moe::cli::add_inspect_command(app, status);

  // CLI11 reads an unknown first word as a stray argument and answers "A subcommand is
  // required"; name it instead.
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->check_name(argv[1]);
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::cerr << "moe: unknown command '" << one_line(argv[1]) << "' (expected one of "
                << names << "; see --help)\n";
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Usage errors: one line, status 2 (CLI11's own codes are >= 100).
    std::cerr << "moe: " << one_line(e.what()) << " (see --help)\n";
    return 2;
  } catch (const moe::Error& e) {
    std::cerr << "moe: " << one_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "moe: " << one_line(e.what()) << "\n";
    return 1;
  }
  return status;
}
