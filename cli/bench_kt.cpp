// `moe bench`: the kt-kernel (KTransformers) peer, bench/peers/kt_peer.py run as a subprocess
// under the interpreter of its own environment (.venv-kt/, scripts/bench_setup.sh: kt-kernel
// pins torch 2.9.1, the project's .venv/ has torch 2.15). Given the row's tokens and the routing
// libmoe chose for them through a temporary file, so that both run the same experts on the same
// rows, in the row's precision: bf16, int8, int4 (kt-kernel's group-wise class at the row's
// group), mxfp4, fp8 (bench/peers/kt_peer.py names the classes and how each is fed). Where it
// cannot run, the row says "skipped: <reason>", never a number.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "bench.hpp"
#include "moe/error.hpp"

namespace moe::cli::bench {

std::string kt_python(const BenchOptions& o) {
  if (!o.kt_python.empty()) return o.kt_python;
  if (const char* env = std::getenv("MOE_KT_PYTHON"); env && *env) return env;
  if (const char* env = std::getenv("MOE_KT_VENV"); env && *env) return std::string(env) + "/bin/python";
  return std::string(MOE_SOURCE_DIR) + "/.venv-kt/bin/python";
}

std::string kt_not_applicable(const BenchCase& c) {
  const MoEConfig& m = c.cfg;
  if (m.precision == Precision::fp32)
    return "kt-kernel has no fp32 MoE (bf16, int8, int4, mxfp4, fp8 only)";
  if (m.expert != ExpertKind::swiglu)  // (the activation field is mlp's: swiglu's is silu)
    return std::string("kt-kernel's MoE runs swiglu experts, this row's are ") + to_string(m.expert);
  if (m.expert_bias) return "kt-kernel's MoE has no expert biases";
  if (m.n_shared_experts > 0) return "kt-kernel's MoE has no shared experts";
  if (c.training || c.backward) return "kt-kernel's MoE is inference only";
  return "";
}

namespace {

// How far the peer's output may be from the float32 evaluation of the unquantized weights
// (relative to the largest reference value) before it is taken for a block the peer did not
// compute (a misread layout: ~100%) rather than a figure. bf16 and int8: rounding, a few
// percent. fp8: its rounding, ~4%. int4 (kt-kernel's own quantization, group-wise with zero
// points) and mxfp4: their quantization alone errs 14-20% on random weights.
double kt_check_limit(Precision p) {
  switch (p) {
    case Precision::int4:
    case Precision::mxfp4: return 0.4;
    case Precision::fp8: return 0.15;
    default: return 0.1;
  }
}
// The formats the peer quantizes itself (mxfp4, fp8) are also held to the weights as quantized:
// there only kt-kernel's bf16 activations and the output's bf16 rounding remain.
constexpr double kKtQuantizedLimit = 0.05;

std::string peer_script() { return std::string(MOE_SOURCE_DIR) + "/bench/peers/kt_peer.py"; }

// A temporary file holding x (T, d) float32, ids (T, k) int32, weights (T, k) float32.
std::string write_routing(const Result& r) {
  char path[] = "/tmp/moe-bench-kt-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) return "";
  ::close(fd);
  const int64_t T = r.c.T, d = r.c.cfg.d_model;
  const std::vector<float> x = bench_input(T, d);
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(x.data()),
          static_cast<std::streamsize>(x.size() * sizeof(float)));
  f.write(reinterpret_cast<const char*>(r.route_indices.data()),
          static_cast<std::streamsize>(r.route_indices.size() * sizeof(int32_t)));
  f.write(reinterpret_cast<const char*>(r.route_weights.data()),
          static_cast<std::streamsize>(r.route_weights.size() * sizeof(float)));
  if (!f) {
    std::remove(path);
    return "";
  }
  return path;
}

// The signal that ended the peer, 0 when none (see exit_text).
int exit_signal(int status) {
  if (WIFSIGNALED(status)) return WTERMSIG(status);
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  return code > 128 && code < 128 + 65 ? code - 128 : 0;
}

// How the peer's process ended, from pclose's wait status: "exited with status 134 (signal 6,
// Aborted)" where the shell reports a signal as 128 + its number, "was killed (signal 11,
// Segmentation fault)" where the shell had handed its process over.
std::string exit_text(int status) {
  const int s = exit_signal(status);
  const std::string sig = s ? "signal " + std::to_string(s) + ", " + ::strsignal(s) : "";
  if (WIFSIGNALED(status)) return "was killed (" + sig + ")";
  if (!WIFEXITED(status)) return "ended with wait status " + std::to_string(status);
  return "exited with status " + std::to_string(WEXITSTATUS(status)) +
         (s ? " (" + sig + ")" : "");
}

// The peer's last line of standard error (at most 200 characters; "" when none), passing over
// the shell's own report of the signal ("Aborted", "Segmentation fault (core dumped)").
std::string last_words(const std::string& path, int status) {
  std::ifstream f(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) lines.push_back(line);
  const int s = exit_signal(status);
  if (s && !lines.empty() && lines.back().rfind(::strsignal(s), 0) == 0) lines.pop_back();
  return lines.empty() ? std::string() : lines.back().substr(0, 200);
}

}  // namespace

json kt_probe(const BenchOptions& o) {
  static json cached;
  if (!cached.is_null()) return cached;
  const std::string py = kt_python(o);
  if (::access(py.c_str(), X_OK) != 0) {
    cached = {{"ok", false},
              {"reason", "no kt-kernel environment (" + py +
                             " not found: run scripts/bench_setup.sh)"}};
    return cached;
  }
  int rc = 0;
  const json res =
      run_json_command(shell_quote(py) + " " + shell_quote(peer_script()) + " --probe 2>/dev/null", rc);
  if (rc != 0 || res.is_discarded() || !res.is_object() || !res.contains("ok")) {
    cached = {{"ok", false},
              {"reason", "kt-kernel probe failed (status " + std::to_string(rc) + ", " + py + ")"}};
    return cached;
  }
  cached = res;
  return cached;
}

void run_kt_peer(Result& r, const BenchOptions& o, int threads) {
  const BenchCase& c = r.c;
  if (o.no_kt) {
    r.kt_note = "skipped: --no-kt";
    return;
  }
  if (const std::string why = kt_not_applicable(c); !why.empty()) {
    r.kt_note = "skipped: " + why;
    return;
  }
  const json probe = kt_probe(o);
  if (!probe.value("ok", false)) {
    r.kt_note = "skipped: " + probe.value("reason", std::string("kt-kernel unavailable"));
    return;
  }
  const MoEConfig& m = c.cfg;
  if (static_cast<int64_t>(r.route_indices.size()) != c.T * m.k) {
    r.kt_note = "skipped: libmoe's routing for the row was not recorded";
    return;
  }
  const std::string routing = write_routing(r);
  if (routing.empty()) {
    r.kt_note = "skipped: could not write the routing file";
    return;
  }
  json cs = {{"T", c.T},
             {"d", m.d_model},
             {"f", m.hidden()},
             {"E", m.n_experts},
             {"k", m.k},
             {"precision", to_string(m.precision)},
             {"seed", m.seed}};
  // kt-kernel's group-wise int4 at libmoe's group size (kt-kernel's class always has zero
  // points; libmoe's row has them when int4_zero_points is set).
  if (m.precision == Precision::int4) cs["int4_group"] = m.int4_group;
  const std::string cmd = shell_quote(kt_python(o)) + " " + shell_quote(peer_script()) +
                          " --case " + shell_quote(cs.dump()) + " --routing " +
                          shell_quote(routing) + " --threads " + std::to_string(threads) +
                          " --repeat " + std::to_string(std::max(o.repeat, 1)) + " --layers " +
                          std::to_string(std::max(r.cold_layers, 1));
  // kt-kernel's own output (and the last words of a kernel that kills its process) goes to a
  // temporary file rather than the bench's standard error.
  char err_path[] = "/tmp/moe-bench-kt-err-XXXXXX";
  const int err_fd = ::mkstemp(err_path);
  if (err_fd >= 0) ::close(err_fd);
  int rc = 0;
  const json res =
      run_json_command(cmd + (err_fd >= 0 ? " 2>" + shell_quote(err_path) : std::string()), rc);
  std::remove(routing.c_str());
  const std::string words = err_fd >= 0 ? last_words(err_path, rc) : std::string();
  if (err_fd >= 0) std::remove(err_path);
  if (!res.is_discarded() && res.is_object() && res.contains("skipped")) {
    r.kt_note = "skipped: " + res["skipped"].get<std::string>();
    return;
  }
  if (rc != 0 || res.is_discarded() || !res.contains("fwd_s")) {
    // A kernel that kills its process (an instruction this CPU lacks, an assertion, a stack
    // check) ends here.
    r.kt_note = "skipped: the kt-kernel peer " + exit_text(rc) + " and no result" +
                (words.empty() ? "" : "; its last line: " + words);
    return;
  }
  const std::string format = res.value("format", std::string());
  r.kt_impl = "kt-kernel " + res.value("kt_kernel", std::string("?")) + " " +
              res.value("class", std::string("?")) + " (" +
              (m.precision != Precision::bf16 && !format.empty() ? format + "; " : std::string()) +
              res.value("variant", std::string("?")) + " variant" +
              (m.precision == Precision::int8
                   ? ", int8 kernel " + res.value("int8_kernel", std::string("?"))
                   : std::string()) +
              ", torch " + res.value("torch", std::string("?")) + ")";
  if (res.contains("check_rel_err_quantized") && res["check_rel_err_quantized"].is_number()) {
    r.kt_check_err_quantized = res["check_rel_err_quantized"].get<double>();
    if (*r.kt_check_err_quantized > kKtQuantizedLimit) {
      r.kt_note = "skipped: kt-kernel's output differs from the float32 evaluation of the " +
                  std::string(to_string(m.precision)) + " weights it was given by " +
                  fmt(100.0 * *r.kt_check_err_quantized, 1) + "% of its largest value";
      return;
    }
  }
  if (res.contains("check_rel_err") && res["check_rel_err"].is_number()) {
    r.kt_check_err = res["check_rel_err"].get<double>();
    // Beyond rounding and quantization (kt_check_limit) the peer did not compute the block (a
    // layout misread): not a figure.
    if (*r.kt_check_err > kt_check_limit(m.precision)) {
      r.kt_note = "skipped: kt-kernel's output differs from the float32 reference by " +
                  fmt(100.0 * *r.kt_check_err, 1) + "% of its largest value (" +
                  to_string(m.precision) + ": at most " +
                  fmt(100.0 * kt_check_limit(m.precision), 0) + "%)";
      return;
    }
  }
  r.kt_fwd_s = res["fwd_s"].get<double>();
}

}  // namespace moe::cli::bench
