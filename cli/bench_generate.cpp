// `moe bench --config generate-qwen3 | generate-gpt-oss`: greedy generation with a
// transformers model of that shape, its MoE blocks as transformers has them and replaced by
// libmoe's in each precision asked for (examples/generate.py; issue 21, part 5). The script
// runs under peer_python() with this build's Python package first on PYTHONPATH, and its
// table (or, with --json, its JSON lines) goes to standard output as it prints it.
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "bench.hpp"
#include "moe/error.hpp"

namespace moe::cli::bench {

namespace {

struct GenerateConfig {
  const char* name;   // --config
  const char* model;  // examples/generate.py --model
};
constexpr GenerateConfig kGenerateConfigs[] = {{"generate-qwen3", "qwen3"},
                                               {"generate-gpt-oss", "gpt-oss"}};

// The precisions when --precision is not given: the script's default rows.
constexpr const char* kDefaultPrecisions = "bf16,int8,int4,published";

// --quick: the family's structure at the script's --tiny sizes, a smoke test of seconds.
constexpr int kQuickPrompt = 16;
constexpr int kQuickNewTokens = 4;

// This build's Python package: python/ beside the executable's bin/ folder (the build tree's
// build/python; an installed moe imports the package of its own environment).
std::string build_python_package() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  const std::string exe = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  return exe.substr(0, exe.find_last_of('/') + 1) + "../python";
}

}  // namespace

std::string generate_model(const std::string& config) {
  for (const GenerateConfig& g : kGenerateConfigs)
    if (config == g.name) return g.model;
  return "";
}

std::string generate_script() {
  if (const char* env = std::getenv("MOE_GENERATE_SCRIPT"); env && *env) return env;
  return std::string(MOE_SOURCE_DIR) + "/examples/generate.py";
}

std::vector<std::string> generate_args(const BenchOptions& o, int threads) {
  const std::string model = generate_model(o.config);
  if (model.empty()) throw Error("--config: '" + o.config + "' is not a generation config");
  if (!o.model.empty())
    throw Error("--model: not with --config " + o.config +
                " (it builds its model from the published config)");
  std::vector<std::string> args = {
      "--model", model,
      "--threads", std::to_string(threads),
      "--repeat", std::to_string(o.repeat),
      "--prompt", std::to_string(o.quick ? kQuickPrompt : o.tokens),
      "--precisions", o.precision.empty() ? kDefaultPrecisions : o.precision};
  if (o.quick)
    args.insert(args.end(), {"--tiny", "--layers", "1", "--new-tokens",
                             std::to_string(kQuickNewTokens)});
  if (o.json_out) args.emplace_back("--json");
  return args;
}

int run_generate(const BenchOptions& o, int threads) {
  const std::vector<std::string> args = generate_args(o, threads);
  const std::string script = generate_script();
  if (access(script.c_str(), R_OK) != 0)
    throw Error("--config " + o.config + ": no generation script at " + script +
                " (MOE_GENERATE_SCRIPT names another)");
  std::string cmd = "PYTHONPATH=" + shell_quote(build_python_package()) +
                    "${PYTHONPATH:+:$PYTHONPATH} " + shell_quote(peer_python()) + " " +
                    shell_quote(script);
  for (const std::string& a : args) {
    cmd += ' ';
    cmd += shell_quote(a);
  }
  std::cerr << "bench: " << o.config << ": " << cmd << '\n';
  std::cout.flush();
  const int rc = std::system(cmd.c_str());
  if (rc == -1 || !WIFEXITED(rc) || WEXITSTATUS(rc) == 127)
    throw Error("--config " + o.config + ": could not run " + peer_python() + " " + script);
  if (WEXITSTATUS(rc) != 0) {
    std::cerr << "moe: --config " << o.config << ": " << script << " exited with status "
              << WEXITSTATUS(rc) << '\n';
    return 1;
  }
  if (!o.json_out)
    std::cout << "\nmoe bench --config " << o.config << ": " << threads << " thread(s), load "
              << "average " << fmt(load_average(), 2) << " at the end on "
              << std::thread::hardware_concurrency() << " CPU(s)\n";
  return 0;
}

}  // namespace moe::cli::bench
