// `moe bench`: the PyTorch peers (bench/peers/*.py) run as subprocesses.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <omp.h>
#include <unistd.h>

#include "bench.hpp"
#include "moe/error.hpp"
#include "moe/router.hpp"

namespace moe::cli::bench {

// The interpreter the PyTorch peer runs under: MOE_PYTHON, else the project's environment
// (.venv of the source tree, made by scripts/setup.sh), else Debian's python3.
std::string peer_python() {
  if (const char* env = std::getenv("MOE_PYTHON"); env && *env) return env;
  const std::string venv = std::string(MOE_SOURCE_DIR) + "/.venv/bin/python";
  if (access(venv.c_str(), X_OK) == 0) return venv;
  return "/usr/bin/python3";
}

bool python_has_torch() {
  static const bool has = [] {
    const std::string cmd = "'" + peer_python() + "' -c 'import torch' >/dev/null 2>&1";
    return std::system(cmd.c_str()) == 0;
  }();
  return has;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

// Runs a shell command and parses the last line of its standard output as JSON. Returns a
// discarded value (is_discarded()) when it could not start or printed no JSON; rc gets the
// exit status (-1 when it could not start).
json run_json_command(const std::string& cmd, int& rc) {
  rc = -1;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return json::parse("", nullptr, false);
  std::string out;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  rc = pclose(p);
  const auto nl = out.find_last_of('\n', out.size() >= 2 ? out.size() - 2 : 0);
  return json::parse(nl == std::string::npos ? out : out.substr(nl + 1), nullptr, false);
}

void run_peer(Result& r, const BenchOptions& o, int threads) {
  const BenchCase& c = r.c;
  const MoEConfig& m = c.cfg;
  json cs = {{"T", c.T},
             {"d", m.d_model},
             {"d_ff", m.hidden()},
             {"d_out", m.out_dim()},
             {"E", m.n_experts},
             {"k", m.k},
             {"expert", to_string(m.expert)},
             {"activation", to_string(m.activation)},
             {"noise", to_string(m.noise)},
             {"router_std", m.router_init_std},
             {"bias", m.expert_bias},
             {"aux_alpha", m.aux_alpha},
             {"training", c.training},
             {"backward", c.backward && r.fwdbwd_s.has_value()},
             {"seed", m.seed},
             {"router", to_string(m.router_kind)},
             {"renormalize", m.renormalize},
             {"dtype", m.precision == Precision::bf16 ? "bf16" : "fp32"},
             // Cold decode: as many copies of the layer as libmoe's row rotated over.
             {"layers", c.memory_roof ? std::max(r.cold_layers, 1) : 1}};
  cs["cf"] = m.capacity_factor ? json(*m.capacity_factor) : json(nullptr);
  const std::string script =
      o.peer_script.empty() ? std::string(MOE_SOURCE_DIR) + "/bench/peers/moe_peer.py" : o.peer_script;
  const std::string cmd = "OPENBLAS_CORETYPE=Cooperlake " + shell_quote(peer_python()) + " " +
                          shell_quote(script) +
                          " --threads " + std::to_string(threads) + " --repeat " +
                          std::to_string(std::max(o.repeat, 1)) + " --case " +
                          shell_quote(cs.dump());
  int rc = 0;
  const json res = run_json_command(cmd, rc);
  if (rc == -1) {
    r.peer_note = "n/a (could not start python)";
    return;
  }
  if (rc != 0 || res.is_discarded() || !res.contains("fwd_s")) {
    r.peer_note = "n/a (peer failed, status " + std::to_string(rc) + ")";
    return;
  }
  r.peer_fwd_s = res["fwd_s"].get<double>();
  if (res.contains("fwdbwd_s") && res["fwdbwd_s"].is_number())
    r.peer_fwdbwd_s = res["fwdbwd_s"].get<double>();
  if (res.contains("blas") && res["blas"].is_string()) r.peer_blas = res["blas"];
  if (res.contains("form") && res["form"].is_string()) r.peer_form = res["form"];
  if (res.contains("form_fwdbwd") && res["form_fwdbwd"].is_string())
    r.peer_form_fwdbwd = res["form_fwdbwd"];
  // Every form a PyTorch user would write, each measured: the peer is the fastest.
  if (res.contains("forms") && res["forms"].is_object())
    for (const auto& [name, f] : res["forms"].items()) {
      PeerForm pf;
      pf.name = name;
      if (f.contains("fwd_s") && f["fwd_s"].is_number()) pf.fwd_s = f["fwd_s"].get<double>();
      if (f.contains("fwdbwd_s") && f["fwdbwd_s"].is_number())
        pf.fwdbwd_s = f["fwdbwd_s"].get<double>();
      r.peer_forms.push_back(pf);
    }
}

// What moe.torch.MoE adds over the bare library at B1, one JSON object per precision
// (bench/peers/module_overhead.py, run under peer_python() with this build's package first on
// PYTHONPATH). Empty when it could not run; note says why.
std::vector<json> run_module_overhead(const BenchOptions& o, int threads, std::string& note) {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  const std::string exe = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  const std::string pkg = exe.substr(0, exe.find_last_of('/') + 1) + "../python";
  const std::string script = std::string(MOE_SOURCE_DIR) + "/bench/peers/module_overhead.py";
  std::vector<json> rows;
  for (const char* p : {"fp32", "bf16"}) {
    const std::string cmd = "PYTHONPATH=" + shell_quote(pkg) + " " + shell_quote(peer_python()) +
                            " " + shell_quote(script) + " --threads " + std::to_string(threads) +
                            " --repeat " + std::to_string(std::max(o.repeat, 1)) +
                            (o.quick ? " --quick" : "") + " --precision " + p;
    int rc = 0;
    const json res = run_json_command(cmd, rc);
    if (rc != 0 || res.is_discarded() || !res.contains("overhead_fwd")) {
      note = "module overhead: could not run (status " + std::to_string(rc) +
             "; needs torch in " + peer_python() + ")";
      return {};
    }
    rows.push_back(res);
  }
  return rows;
}

}  // namespace moe::cli::bench
