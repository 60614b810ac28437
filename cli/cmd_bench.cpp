// `moe bench`: the MoE layer's performance against the machine.
//
// For each configuration (B1, B2, B3 at T = 1, 4, 16, the E-sweep; the real-model blocks)
// it measures, in the same run: the layer's forward and forward+backward time (median of
// --repeat after a warm-up), the router's forward alone, the roof (oneDNN's GEMM in the
// row's precision on the dense [T·k, d] × [d, d_ff] product, timed before every layer
// sample so that the shares of the roof are medians of pairs measured together; for decode
// the streaming read bandwidth over the selected experts' weight bytes; for the real-model
// blocks the larger of the two),
// memory (parameters, gradients, the layer's workspace, the largest single allocation and
// how the workspace grows from T/2 to T), and the PyTorch peer bench/peers/moe_peer.py run
// as a subprocess (peer_python()). Then it prints the performance goals and whether
// each is met. FLOP counting: src/perf/suite.hpp and docs/benchmarks.md.
//
// Heap accounting: this file replaces the global operator new/delete of the `moe` binary
// with counting versions (malloc + malloc_usable_size; a relaxed atomic add per call) so
// that the layer's own allocations can be measured. oneDNN's internal buffers go through
// malloc directly and are not counted.
#include <malloc.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <memory>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/router.hpp"
#include "perf/roofline.hpp"
#include "perf/suite.hpp"

#ifndef MOE_SOURCE_DIR
#define MOE_SOURCE_DIR "."
#endif

// ---- heap accounting -------------------------------------------------------------------

namespace {

std::atomic<int64_t> g_live{0}, g_peak{0}, g_count{0}, g_largest{0};

void note_alloc(void* p) {
  const auto n = static_cast<int64_t>(malloc_usable_size(p));
  const int64_t live = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  g_count.fetch_add(1, std::memory_order_relaxed);
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
  int64_t big = g_largest.load(std::memory_order_relaxed);
  while (n > big && !g_largest.compare_exchange_weak(big, n, std::memory_order_relaxed)) {
  }
}

void note_free(void* p) {
  g_live.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}

void* counted_alloc(std::size_t n) {
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  note_alloc(p);
  return p;
}

void* counted_alloc_aligned(std::size_t n, std::align_val_t al) {
  const auto a = std::max(static_cast<std::size_t>(al), sizeof(void*));
  void* p = nullptr;
  if (posix_memalign(&p, a, n ? n : 1) != 0) throw std::bad_alloc();
  note_alloc(p);
  return p;
}

void counted_free(void* p) noexcept {
  if (!p) return;
  note_free(p);
  std::free(p);
}

}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc_aligned(n, a); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }

namespace moe::cli {

namespace {

using json = nlohmann::json;
using perf::BenchCase;

// A window of heap accounting: peak and largest allocation since start(), relative to the
// bytes live at start().
struct HeapWindow {
  int64_t base = 0, count0 = 0;
  void start() {
    base = g_live.load();
    g_peak.store(base);
    g_largest.store(0);
    count0 = g_count.load();
  }
  int64_t peak() const { return g_peak.load() - base; }
  int64_t live() const { return g_live.load() - base; }
  int64_t largest() const { return g_largest.load(); }
  int64_t allocs() const { return g_count.load() - count0; }
};

struct BenchOptions {
  int threads = 0;
  std::string config;
  int repeat = 5;
  bool no_peer = false;
  bool quick = false;
  bool json_out = false;
  std::string peer_script;
  double mem_fraction = 0.7;
  bool no_dist = false;
  std::string precision;  // empty: each configuration's own (fp32, the real models bf16)
};

// Expert parallelism on loopback: `moe_dist_bench --json` under mpirun, one row
// per rank count. Its figures come from the ranks' own timers around every MPI call.
struct DistResult {
  int P = 0;
  std::string note;  // why it did not run
  json res;          // moe_dist_bench's JSON object when it ran
};

// Everything measured for one configuration; unset optionals print as n/a / null.
struct Result {
  BenchCase c;
  std::string roof_impl;  // the oneDNN kernel of the compute roof (its ISA)
  bool memory_bound = false;  // the roof is the read bandwidth's (decode, real-model rows)
  std::string note;  // why something was not measured
  bool ran = false;
  double fwd_s = 0, router_s = 0;
  std::optional<double> fwdbwd_s;
  double gflop_fwd = 0;
  std::string roof_kind;
  double roof_gflops = 0, roof_s = 0;  // roof_s: the forward's FLOPs at the roof rate
  // Shares of the roof reached: medians of per-repeat ratios, each layer sample against the
  // roof sample taken just before it (sgemm rate or read bandwidth; see run_layer).
  double ratio_fwd = 0;
  std::optional<double> ratio_fwdbwd;
  std::vector<double> roof_samples, ratio_fwd_samples, ratio_fwdbwd_samples;  // GFLOP/s, shares
  double read_bw = 0;                  // bytes/s (memory roof), median of read_bw_samples
  std::vector<double> read_bw_samples;  // one before every forward sample
  int64_t selected_bytes = 0;          // memory roof
  int64_t param_bytes = 0, grad_bytes = 0, peak_bytes = 0, workspace_bytes = 0;
  int64_t largest_alloc = 0;
  std::optional<double> ws_growth;  // bytes the layer retains after T / after T/2
  double allocs_fwd = 0, allocs_fwdbwd = 0;
  int64_t kept_rows = 0, dropped = 0, experts_evaluated = 0;
  std::optional<double> peer_fwd_s, peer_fwdbwd_s;
  std::string peer_note, peer_blas;
};

// MemAvailable, or MOE_BENCH_MEM_AVAILABLE (bytes) when set: the tests use it to reach the
// skip and forward-only paths without a machine that is short of memory.
int64_t mem_available_bytes() {
  if (const char* env = std::getenv("MOE_BENCH_MEM_AVAILABLE")) return std::atoll(env);
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return int64_t{1} << 40;  // unknown: do not refuse
}

// What a run of the case holds at once: parameters, gradients when backward runs (the layer
// allocates them on first use), and the activations of T·k rows (a generous bound). bf16
// adds the weights' copies: half the parameter bytes, twice with backward's transposes.
int64_t bytes_needed(const BenchCase& c, bool with_grads) {
  const MoEConfig& m = c.cfg;
  const int64_t R = c.T * m.k;
  const int64_t acts = 4 * (R * (2 * m.d_model + 6 * m.hidden() + 3 * m.out_dim()) +
                            c.T * (4 * m.d_model + 8 * m.n_experts));
  const bool bf16 = m.precision == Precision::bf16;
  return perf::layer_param_bytes(m) * (with_grads ? 2 : 1) + acts +
         (bf16 ? perf::layer_param_bytes(m) / 2 * (with_grads ? 2 : 1) : 0);
}

// Inputs that look like activations: values in [-1, 1) from a fixed hash.
std::vector<float> pattern(int64_t n, uint32_t salt) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ (salt * 0x9E3779B9u);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    v[static_cast<size_t>(i)] = static_cast<float>(h & 0xFFFFu) / 32768.0f - 1.0f;
  }
  return v;
}

void run_layer(Result& r, const BenchOptions& o, std::unique_ptr<perf::ReadRoof>& mem_roof) {
  const BenchCase& c = r.c;
  const MoEConfig& m = c.cfg;
  const int64_t T = c.T, d = m.d_model, Do = m.out_dim();
  const auto x = pattern(T * d, 1), dy = pattern(T * Do, 2);
  std::vector<float> y(static_cast<size_t>(T * Do)), dx(static_cast<size_t>(T * d));
  r.gflop_fwd = perf::layer_flops_fwd(c) / 1e9;

  // Both roofs keep their buffers, allocated before the heap window opens, and are timed
  // again before every layer sample below: the sgemm roof per configuration, the read
  // bandwidth's 1 GiB buffer once for all decode configurations.
  // The compute roof in the layer's precision: oneDNN sgemm, or oneDNN's bf16 matmul.
  const bool bf16 = m.precision == Precision::bf16;
  std::unique_ptr<perf::SgemmRoof> sgemm;
  std::unique_ptr<perf::Bf16Roof> bgemm;
  std::function<double()> roof_run;
  double roof_flops = 0.0;
  if (c.memory_roof || c.weights_roof) {
    if (!mem_roof) {
      mem_roof = std::make_unique<perf::ReadRoof>(o.quick ? (int64_t{128} << 20)
                                                          : (int64_t{1} << 30));
      mem_roof->run_s();  // warm-up
    }
  }
  if (!c.memory_roof) {
    if (bf16) {
      bgemm = std::make_unique<perf::Bf16Roof>(T * m.k, m.hidden(), d);
      roof_run = [&] { return bgemm->run_s(); };
      roof_flops = bgemm->flops();
      r.roof_impl = bgemm->impl();
    } else {
      sgemm = std::make_unique<perf::SgemmRoof>(T * m.k, m.hidden(), d);
      roof_run = [&] { return sgemm->run_s(); };
      roof_flops = sgemm->flops();
      r.roof_impl = "dnnl_sgemm";
    }
    roof_run();  // warm-up: oneDNN's first call sets itself up
  }
  const bool roof = static_cast<bool>(roof_run);
  r.roof_kind = c.memory_roof ? "memory" : c.weights_roof ? (bf16 ? "bf16+memory" : "sgemm+memory")
                                         : (bf16 ? "bf16" : "sgemm");
  const int rep = std::max(o.repeat, 1);
  std::vector<double> fwd_samples, fwdbwd_samples;
  for (auto* v : {&fwd_samples, &fwdbwd_samples, &r.roof_samples, &r.read_bw_samples,
                  &r.ratio_fwd_samples, &r.ratio_fwdbwd_samples})
    v->reserve(static_cast<size_t>(rep));

  HeapWindow heap;
  heap.start();
  MoELayer layer(m);
  for (const auto& name : layer.parameter_names())
    r.param_bytes += layer.param(name).numel() * static_cast<int64_t>(sizeof(float));
  // Gradients exist only where backward runs (the layer allocates them on first use).
  if (c.backward)
    for (const auto& name : layer.parameter_names())
      r.grad_bytes += layer.grad(name).numel() * static_cast<int64_t>(sizeof(float));
  const int64_t constructed = heap.live();

  ForwardOptions fo;
  fo.training = c.training;
  auto fwd = [&](int64_t n) { layer.forward(y.data(), x.data(), n, fo); };
  auto fwdbwd = [&](int64_t n) {
    layer.forward(y.data(), x.data(), n, fo);
    layer.backward(dx.data(), dy.data());
  };
  auto step = [&](int64_t n) { c.backward ? fwdbwd(n) : fwd(n); };

  // Buffers the layer keeps after a call at T/2, then at T: a buffer sized T·E·C (quadratic
  // in T) shows as a ratio near 4, buffers linear in T as a ratio near 2. Retained bytes, not
  // the peak: the peak of the second call also holds the T/2 buffers while they are resized.
  int64_t kept_half = 0;
  if (T >= 2) {
    step(T / 2);
    kept_half = heap.live() - constructed;
  }
  step(T);  // also the warm-up
  const int64_t kept_full = heap.live() - constructed;
  if (T >= 2 && kept_half > 0) r.ws_growth = static_cast<double>(kept_full) / kept_half;

  const MoEStats& st = layer.stats();
  r.kept_rows = T * m.k - st.dropped_assignments;
  r.dropped = st.dropped_assignments;
  r.experts_evaluated = st.experts_evaluated;
  // Bytes a forward must read: the selected experts' weights (in the layer's precision) and
  // the router's.
  if (c.memory_roof || c.weights_roof)
    r.selected_bytes = r.experts_evaluated * perf::expert_read_bytes(m) +
                       d * m.n_experts * static_cast<int64_t>(sizeof(float));

  // Interleaved: per repeat roof, forward, [forward+backward], so that each layer sample has
  // a roof sample taken within a second of it and the VM's drift cancels in their ratio.
  // Allocations are counted inside the layer's calls only (the harness's sample vectors were
  // reserved before the heap window opened).
  int64_t allocs_fwd = 0, allocs_fwdbwd = 0;
  auto timed = [&heap](const std::function<void()>& f, int64_t& allocs) {
    const int64_t a0 = heap.allocs();
    const double t0 = perf::now_s();
    f();
    const double t = perf::now_s() - t0;
    allocs += heap.allocs() - a0;
    return t;
  };
  const bool mem = c.memory_roof || c.weights_roof;
  for (int i = 0; i < rep; ++i) {
    const double roof_gflops = roof ? roof_flops / roof_run() / 1e9 : 0.0;
    const double read_bw = mem ? mem_roof->bytes() / mem_roof->run_s() : 0.0;
    const double tf = timed([&] { fwd(T); }, allocs_fwd);
    fwd_samples.push_back(tf);
    if (roof) r.roof_samples.push_back(roof_gflops);
    if (mem) r.read_bw_samples.push_back(read_bw);
    // The roof's time for this sample (FLOPs at the rate, bytes at the bandwidth measured
    // just before it; the larger of the two when both bound it) over the forward's.
    const double t_flops = roof ? r.gflop_fwd / roof_gflops : 0.0;
    const double t_bytes = mem ? static_cast<double>(r.selected_bytes) / read_bw : 0.0;
    r.ratio_fwd_samples.push_back(std::max(t_flops, t_bytes) / tf);
    if (c.backward) {
      const double tb = timed([&] { fwdbwd(T); }, allocs_fwdbwd);
      fwdbwd_samples.push_back(tb);
      if (roof) r.ratio_fwdbwd_samples.push_back(3.0 * r.gflop_fwd / tb / roof_gflops);
    }
  }
  r.fwd_s = perf::median(fwd_samples);
  r.allocs_fwd = static_cast<double>(allocs_fwd) / rep;
  if (c.backward) {
    r.fwdbwd_s = perf::median(fwdbwd_samples);
    r.allocs_fwdbwd = static_cast<double>(allocs_fwdbwd) / rep;
  }
  if (roof) {
    r.roof_gflops = perf::median(r.roof_samples);
    r.roof_s = r.gflop_fwd / r.roof_gflops;
    r.ratio_fwd = perf::median(r.ratio_fwd_samples);
    if (c.backward) r.ratio_fwdbwd = perf::median(r.ratio_fwdbwd_samples);
  }
  if (c.weights_roof) {
    r.read_bw = perf::median(r.read_bw_samples);
    const double t_bytes = static_cast<double>(r.selected_bytes) / r.read_bw;
    r.memory_bound = t_bytes > r.roof_s;
    r.roof_s = std::max(r.roof_s, t_bytes);
  }
  r.peak_bytes = heap.peak();
  r.largest_alloc = heap.largest();
  r.workspace_bytes = std::max<int64_t>(0, r.peak_bytes - r.param_bytes - r.grad_bytes);

  // The router alone, on the layer's own weights, in the same mode.
  {
    RouterState rs;
    const bool has_b = m.router_bias, has_n = m.noise == Noise::learned;
    RouterParams rp{layer.param("W_g").ptr(), has_b ? layer.param("b_g").ptr() : nullptr,
                    has_n ? layer.param("W_noise").ptr() : nullptr};
    NoiseSource ns;
    ns.seed = m.seed;
    const RouterConfig rc = m.router();
    r.router_s = perf::time_median(
        [&] { router_forward(rs, x.data(), rp, rc, T, c.training, ns); }, 1, rep);
  }

  if (c.memory_roof) {
    r.memory_bound = true;
    r.read_bw = perf::median(r.read_bw_samples);
    r.roof_s = static_cast<double>(r.selected_bytes) / r.read_bw;
    r.roof_gflops = r.gflop_fwd / r.roof_s;
    r.ratio_fwd = perf::median(r.ratio_fwd_samples);
  }
  r.ran = true;
}

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
             {"dtype", m.precision == Precision::bf16 ? "bf16" : "fp32"}};
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
}

// build/bin/moe_dist_bench beside this executable, or "" when it was not built (no MPI).
std::string dist_bench_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  std::string exe(buf, static_cast<size_t>(n));
  const std::string path = exe.substr(0, exe.find_last_of('/') + 1) + "moe_dist_bench";
  return access(path.c_str(), X_OK) == 0 ? path : "";
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

DistResult run_dist(int P, bool quick) {
  DistResult d;
  d.P = P;
  const std::string bin = dist_bench_path();
  if (bin.empty()) {
    d.note = "n/a (moe_dist_bench not built: no MPI)";
    return d;
  }
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
    d.note = "n/a (mpirun not found)";
    return d;
  }
  // One OpenMP thread per rank: P ranks share the machine's cores.
  const std::string cmd = "OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np " +
                          std::to_string(P) + " " + shell_quote(bin) + " --json" +
                          (quick ? " --tokens 64 --d 64 --dff 128 --steps 3" : "") +
                          " 2>/dev/null";
  int rc = 0;
  const json res = run_json_command(cmd, rc);
  if (rc == -1) {
    d.note = "n/a (could not start mpirun)";
    return d;
  }
  if (rc != 0 || res.is_discarded() || !res.contains("comm_share")) {
    d.note = "n/a (mpirun failed, status " + std::to_string(rc) + ")";
    return d;
  }
  d.res = res;
  return d;
}

// The 1-minute load average: on a shared machine every time depends on it.
double load_average() {
  std::ifstream f("/proc/loadavg");
  double l = -1.0;
  f >> l;
  return l;
}

json opt_num(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

std::optional<double> ratio(const std::optional<double>& num, const std::optional<double>& den) {
  if (!num || !den || *den <= 0) return std::nullopt;
  return *num / *den;
}

double gflops_fwd(const Result& r) { return r.gflop_fwd / r.fwd_s; }
std::optional<double> gflops_fwdbwd(const Result& r) {
  if (!r.fwdbwd_s) return std::nullopt;
  return 3.0 * r.gflop_fwd / *r.fwdbwd_s;
}

json to_json(const Result& r, int threads, int repeat) {
  const BenchCase& c = r.c;
  const MoEConfig& m = c.cfg;
  json j = {{"name", c.name},
            {"group", c.group},
            {"T", c.T},
            {"d_model", m.d_model},
            {"d_ff", m.hidden()},
            {"n_experts", m.n_experts},
            {"k", m.k},
            {"expert", to_string(m.expert)},
            {"training", c.training},
            {"precision", to_string(m.precision)},
            {"threads", threads},
            {"repeat", repeat},
            {"loadavg", load_average()}};
  if (!r.ran) {
    for (const char* f : {"fwd_s", "fwdbwd_s", "gflops_fwd", "gflops_fwdbwd", "roof_gflops",
                          "ratio_fwd", "ratio_fwdbwd", "router_share", "peak_bytes", "peer_fwd_s",
                          "peer_fwdbwd_s", "peer_speedup_fwd", "peer_speedup_fwdbwd"})
      j[f] = nullptr;
    j["note"] = r.note;
    return j;
  }
  const auto gfb = gflops_fwdbwd(r);
  j["fwd_s"] = r.fwd_s;
  j["fwdbwd_s"] = opt_num(r.fwdbwd_s);
  j["gflop_fwd"] = r.gflop_fwd;
  j["gflops_fwd"] = gflops_fwd(r);
  j["gflops_fwdbwd"] = opt_num(gfb);
  j["roof_kind"] = r.roof_kind;
  j["roof_impl"] = r.roof_impl;
  j["roof_gflops"] = r.roof_gflops;
  j["roof_fwd_s"] = r.roof_s;
  // Shares of the roof reached. sgemm roof: medians of the per-repeat pairs, which differ
  // from gflops_fwd / roof_gflops (a ratio of medians) by the drift they cancel.
  j["ratio_fwd"] = r.ratio_fwd;
  j["ratio_fwdbwd"] = opt_num(r.ratio_fwdbwd);
  if (!r.roof_samples.empty()) {
    j["roof_gflops_samples"] = r.roof_samples;
    j["ratio_fwd_samples"] = r.ratio_fwd_samples;
    j["ratio_fwdbwd_samples"] = r.ratio_fwdbwd_samples;
  }
  j["router_s"] = r.router_s;
  j["router_share"] = r.router_s / r.fwd_s;
  j["expert_s"] = std::max(0.0, r.fwd_s - r.router_s);
  // Rows bound by the read bandwidth: decode (the roof is the selected weights' bytes at the
  // bandwidth) and the real-model blocks (the larger of that and the FLOPs at the GEMM
  // rate). roof_multiple is the median over the pairs of (forward time / the roof's time at
  // the bandwidth measured just before it).
  if (c.weights_roof || r.roof_kind == "memory") {
    j["read_gbps"] = r.read_bw / 1e9;
    j["selected_weight_bytes"] = r.selected_bytes;
    j["roof_multiple"] = 1.0 / r.ratio_fwd;
    std::vector<double> gbps;
    for (double b : r.read_bw_samples) gbps.push_back(b / 1e9);
    j["read_gbps_samples"] = gbps;
    j["ratio_fwd_samples"] = r.ratio_fwd_samples;
  }
  j["peer_fwd_s"] = opt_num(r.peer_fwd_s);
  j["peer_fwdbwd_s"] = opt_num(r.peer_fwdbwd_s);
  j["peer_speedup_fwd"] = opt_num(ratio(r.peer_fwd_s, r.fwd_s));
  j["peer_speedup_fwdbwd"] = opt_num(ratio(r.peer_fwdbwd_s, r.fwdbwd_s));
  if (!r.peer_note.empty()) j["peer_note"] = r.peer_note;
  if (!r.peer_blas.empty()) j["peer_blas"] = r.peer_blas;
  j["peak_bytes"] = r.peak_bytes;
  j["param_bytes"] = r.param_bytes;
  j["grad_bytes"] = r.grad_bytes;
  j["workspace_bytes"] = r.workspace_bytes;
  j["largest_alloc_bytes"] = r.largest_alloc;
  j["ws_growth_T"] = opt_num(r.ws_growth);
  j["allocs_per_fwd"] = r.allocs_fwd;
  j["allocs_per_fwdbwd"] = r.allocs_fwdbwd;
  j["kept_rows"] = r.kept_rows;
  j["dropped_assignments"] = r.dropped;
  j["experts_evaluated"] = r.experts_evaluated;
  if (!r.note.empty()) j["note"] = r.note;
  return j;
}

std::string fmt(double v, int prec) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << v;
  return os.str();
}
std::string fmt(const std::optional<double>& v, int prec, const std::string& na = "-") {
  return v ? fmt(*v, prec) : na;
}

void print_table(const std::vector<Result>& rs, std::ostream& os) {
  const std::vector<std::pair<std::string, int>> cols = {
      {"config", 18},  {"T", 5},       {"E", 5},        {"fwd ms", 9},   {"GF/s", 7},
      {"roof%", 6},    {"f+b ms", 9},  {"GF/s", 7},     {"roof%", 6},    {"roof GF/s", 9},
      {"router%", 7},  {"peer fwd", 9}, {"x", 6},        {"peer f+b", 9}, {"x", 6},
      {"peak MiB", 9}, {"ws MiB", 8}};
  for (const auto& [h, w] : cols) os << std::setw(w) << h << ' ';
  os << '\n';
  for (const Result& r : rs) {
    const auto& c = r.c;
    const std::string label =
        c.name + (c.cfg.precision == Precision::fp32 ? "" : std::string(" ") +
                                                               to_string(c.cfg.precision));
    std::vector<std::string> v = {label, std::to_string(c.T), std::to_string(c.cfg.n_experts)};
    if (!r.ran) {
      for (size_t i = 0; i < v.size(); ++i) os << std::setw(cols[i].second) << v[i] << ' ';
      os << "  skipped: " << r.note << '\n';
      continue;
    }
    const auto gfb = gflops_fwdbwd(r);
    v.push_back(fmt(r.fwd_s * 1e3, 2));
    v.push_back(fmt(gflops_fwd(r), 1));
    v.push_back(fmt(100.0 * r.ratio_fwd, 0));
    v.push_back(r.fwdbwd_s ? fmt(*r.fwdbwd_s * 1e3, 1) : "-");
    v.push_back(fmt(gfb, 1));
    v.push_back(r.ratio_fwdbwd ? fmt(100.0 * *r.ratio_fwdbwd, 0) : "-");
    v.push_back(fmt(r.roof_gflops, 1) + (r.memory_bound ? "m" : ""));
    v.push_back(fmt(100.0 * r.router_s / r.fwd_s, 1));
    const std::string na = r.peer_note.empty() ? "-" : "n/a";
    v.push_back(r.peer_fwd_s ? fmt(*r.peer_fwd_s * 1e3, 1) : na);
    v.push_back(fmt(ratio(r.peer_fwd_s, r.fwd_s), 1, na));
    v.push_back(r.peer_fwdbwd_s ? fmt(*r.peer_fwdbwd_s * 1e3, 1) : (r.fwdbwd_s ? na : "-"));
    v.push_back(fmt(ratio(r.peer_fwdbwd_s, r.fwdbwd_s), 1, r.fwdbwd_s ? na : "-"));
    v.push_back(fmt(r.peak_bytes / 1048576.0, 1));
    v.push_back(fmt(r.workspace_bytes / 1048576.0, 1));
    for (size_t i = 0; i < v.size(); ++i) os << std::setw(cols[i].second) << v[i] << ' ';
    os << '\n';
  }
  os << "Times are medians; GF/s counts the routed expert FLOPs (T·k rows) plus the router's;"
        " f+b counts 3x the forward.\nroof: oneDNN on [T·k, d] x [d, d_ff] in the row's"
        " precision (fp32 sgemm; bf16 matmul, random operands), timed before every layer\n"
        "sample; roof% is the median of the per-repeat ratios, roof GF/s the median roof sample;"
        " 'm' marks the memory roof (selected\nweight bytes in the row's precision / read"
        " bandwidth); the real-model rows take the larger of the two roof times.\n"
        "x: how many times faster than the PyTorch peer. ws: peak heap beyond parameters and"
        " gradients.\n";
  for (const Result& r : rs)
    if (r.ran && !r.note.empty()) os << r.c.name << ": " << r.note << '\n';
  for (const Result& r : rs)
    if (!r.peer_note.empty() && r.note.empty()) {
      os << "peer: " << r.peer_note << '\n';
      break;
    }
  for (const Result& r : rs)
    if (!r.peer_blas.empty()) {
      os << "peer BLAS: " << r.peer_blas << '\n';
      break;
    }
  std::vector<std::string> impls;
  for (const Result& r : rs)
    if (!r.roof_impl.empty() &&
        std::find(impls.begin(), impls.end(), r.roof_impl) == impls.end())
      impls.push_back(r.roof_impl);
  for (const std::string& i : impls) os << "roof kernel: " << i << '\n';
}

const Result* find(const std::vector<Result>& rs, const std::string& name,
                   Precision p = Precision::fp32) {
  for (const Result& r : rs)
    if (r.c.name == name && r.c.cfg.precision == p && r.ran) return &r;
  return nullptr;
}

struct Goal {
  std::string text;
  std::optional<bool> met;  // nullopt: not measured in this run
  std::string detail;
};

std::vector<Goal> evaluate_goals(const std::vector<Result>& rs) {
  std::vector<Goal> g;
  auto at_least = [&](const std::string& text, const std::optional<double>& v, double target,
                      const std::string& unit, const std::string& why_na) {
    if (!v)
      g.push_back({text, std::nullopt, why_na});
    else
      g.push_back({text, *v >= target,
                   fmt(*v, 2) + unit + " (target >= " + fmt(target, 2) + unit + ")"});
  };
  const Result* b1 = find(rs, "B1");
  const Result* b2 = find(rs, "B2");
  auto roof_ratio = [](const Result* r) -> std::optional<double> {
    if (!r) return std::nullopt;
    return r->ratio_fwd;
  };
  auto roof_ratio_fb = [](const Result* r) -> std::optional<double> {
    if (!r) return std::nullopt;
    return r->ratio_fwdbwd;
  };
  auto peer_x = [](const Result* r, bool fb) -> std::optional<double> {
    if (!r) return std::nullopt;
    return fb ? ratio(r->peer_fwdbwd_s, r->fwdbwd_s) : ratio(r->peer_fwd_s, r->fwd_s);
  };
  auto na = [](const Result* r, bool peer) -> std::string {
    if (!r) return "not run";
    if (peer && !r->peer_note.empty()) return r->peer_note;
    return peer ? "no peer run" : "not measured";
  };
  at_least("B1 forward >= 80% of the roof", roof_ratio(b1), 0.8, "", na(b1, false));
  at_least("B1 forward >= 2x faster than the peer", peer_x(b1, false), 2.0, "x", na(b1, true));
  at_least("B1 forward+backward >= 70% of the roof", roof_ratio_fb(b1), 0.7, "", na(b1, false));
  at_least("B1 forward+backward >= 5x faster than the peer", peer_x(b1, true), 5.0, "x",
           na(b1, true));
  at_least("B2 forward >= 60% of its roof", roof_ratio(b2), 0.6, "", na(b2, false));
  at_least("B2 forward >= 3x faster than the peer", peer_x(b2, false), 3.0, "x", na(b2, true));

  if (const Result* b3 = find(rs, "B3-T1")) {
    const double m = 1.0 / b3->ratio_fwd;  // median over forward/roof pairs
    g.push_back({"B3 T=1 within 1.3x of its memory roof", m <= 1.3,
                 fmt(m, 2) + "x the roof (" + fmt(b3->fwd_s * 1e3, 1) + " ms vs " +
                     fmt(b3->roof_s * 1e3, 1) + " ms at " + fmt(b3->read_bw / 1e9, 1) +
                     " GB/s)"});
  } else {
    g.push_back({"B3 T=1 within 1.3x of its memory roof", std::nullopt, "not run"});
  }

  const Result* e8 = find(rs, "E8");
  const Result* e1024 = find(rs, "E1024");
  if (e8 && e1024) {
    const double t8 = e8->fwd_s - e8->router_s, t1024 = e1024->fwd_s - e1024->router_s;
    std::string shares;
    for (const Result& r : rs)
      if (r.c.group == "E-sweep" && r.ran)
        shares += " " + r.c.name + " " + fmt(100.0 * r.router_s / r.fwd_s, 1) + "%";
    g.push_back({"E-sweep: expert time grows <= 2x from E=8 to E=1024", t1024 / t8 <= 2.0,
                 fmt(t1024 / t8, 2) + "x (" + fmt(t8 * 1e3, 1) + " -> " + fmt(t1024 * 1e3, 1) +
                     " ms); router share" + shares});
  } else {
    std::string why = "not run";
    for (const Result& r : rs)
      if (r.c.group == "E-sweep" && !r.ran && !r.note.empty()) why = r.c.name + ": " + r.note;
    g.push_back({"E-sweep: expert time grows <= 2x from E=8 to E=1024", std::nullopt, why});
  }

  // bf16 on the matrix engine: each row beside the bf16 roof and the bf16 peer.
  const Precision bf = Precision::bf16;
  const bool any_bf16 = std::any_of(rs.begin(), rs.end(), [](const Result& r) {
    return r.c.cfg.precision == Precision::bf16;
  });
  if (any_bf16) {
    const Result* b1b = find(rs, "B1", bf);
    at_least("bf16 B1 forward >= 70% of the bf16 roof", roof_ratio(b1b), 0.7, "", na(b1b, false));
    at_least("bf16 B1 forward >= 3x faster than the bf16 peer", peer_x(b1b, false), 3.0, "x",
             na(b1b, true));
    at_least("bf16 B1 forward+backward >= 55% of the bf16 roof", roof_ratio_fb(b1b), 0.55, "",
             na(b1b, false));
    at_least("bf16 B1 forward+backward >= 10x faster than the bf16 peer", peer_x(b1b, true),
             10.0, "x", na(b1b, true));
    const Result* q3 = find(rs, "Qwen3-30B-A3B", bf);
    const Result* mx = find(rs, "Mixtral-8x7B", bf);
    at_least("bf16 Qwen3-30B-A3B block forward >= 70% of its roof", roof_ratio(q3), 0.7, "",
             na(q3, false));
    at_least("bf16 Qwen3-30B-A3B block >= 1.8x faster than the bf16 peer", peer_x(q3, false),
             1.8, "x", na(q3, true));
    at_least("bf16 Mixtral-8x7B block forward >= 70% of its roof", roof_ratio(mx), 0.7, "",
             na(mx, false));
    at_least("bf16 Mixtral-8x7B block >= 3x faster than the bf16 peer", peer_x(mx, false), 3.0,
             "x", na(mx, true));
    if (const Result* d = find(rs, "B3-T1", bf)) {
      const double m = 1.0 / d->ratio_fwd;
      g.push_back({"bf16 B3 T=1 within 1.15x of its memory roof", m <= 1.15,
                   fmt(m, 2) + "x the roof (" + fmt(d->fwd_s * 1e3, 1) + " ms vs " +
                       fmt(d->roof_s * 1e3, 1) + " ms at " + fmt(d->read_bw / 1e9, 1) +
                       " GB/s)"});
    } else {
      g.push_back({"bf16 B3 T=1 within 1.15x of its memory roof", std::nullopt, "not run"});
    }
  }

  // Memory: reported for every configuration; a buffer of T·E·C grows quadratically in T.
  std::optional<double> worst;
  std::string worst_name;
  int reported = 0;
  for (const Result& r : rs) {
    if (!r.ran) continue;
    ++reported;
    if (r.ws_growth && (!worst || *r.ws_growth > *worst)) {
      worst = r.ws_growth;
      worst_name = r.c.name;
    }
  }
  if (!worst)
    g.push_back({"peak memory reported; no buffer grows with T·E·C", std::nullopt,
                 reported ? "no configuration with T >= 2" : "not run"});
  else
    g.push_back({"peak memory reported; no buffer grows with T·E·C", *worst <= 3.0,
                 "peak reported for " + std::to_string(reported) +
                     " configurations; retained buffers (T)/(T/2) at most " + fmt(*worst, 2) +
                     " (" + worst_name + "; linear ~2, T·E·C ~4)"});
  return g;
}

void print_goals(const std::vector<Goal>& goals, std::ostream& os) {
  os << "Goals (2 threads):\n";
  for (const Goal& g : goals) {
    const char* mark = !g.met ? "n/a   " : *g.met ? "met   " : "MISSED";
    os << "  [" << mark << "] " << g.text << ": " << g.detail << '\n';
  }
}

int run_bench(const BenchOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  const int threads = omp_get_max_threads();
  if (o.repeat < 1) throw Error("--repeat: must be >= 1, got " + std::to_string(o.repeat));
  std::optional<Precision> precision;
  if (!o.precision.empty()) precision = parse_precision(o.precision);
  std::vector<BenchCase> cases =
      o.config.empty() ? perf::default_cases(o.quick, precision.value_or(Precision::fp32))
                       : perf::bench_cases(o.quick);
  const bool dist_only = o.config == "dist";
  if (o.config == "module") {  // moe.torch.MoE over the bare library, B1 in fp32 and bf16
    std::string note;
    const auto rows = run_module_overhead(o, threads, note);
    if (rows.empty()) throw Error(note);
    if (o.json_out) {
      for (const json& r : rows) std::cout << r.dump() << std::endl;
      return 0;
    }
    std::cout << "moe.torch.MoE against the bare library (moe.MoE), B1, " << threads
              << " thread(s), medians of " << o.repeat << " interleaved repeats\n"
              << "| precision | bare fwd ms | module fwd ms | overhead | bare f+b ms | "
                 "module f+b ms | overhead |\n|---|---|---|---|---|---|---|\n";
    bool met = true;
    for (const json& r : rows) {
      const double of = r["overhead_fwd"].get<double>(), ob = r["overhead_fwdbwd"].get<double>();
      met = met && of <= 0.03 && ob <= 0.05;
      std::cout << "| " << r["precision"].get<std::string>() << " | "
                << fmt(1e3 * r["bare_fwd_s"].get<double>(), 1) << " | "
                << fmt(1e3 * r["mod_fwd_s"].get<double>(), 1) << " | " << fmt(100.0 * of, 1)
                << "% | " << fmt(1e3 * r["bare_fb_s"].get<double>(), 1) << " | "
                << fmt(1e3 * r["mod_fb_s"].get<double>(), 1) << " | " << fmt(100.0 * ob, 1)
                << "% |\n";
    }
    std::cout << "\nGoal: module overhead <= 3% forward, <= 5% forward+backward: "
              << (met ? "met" : "MISSED") << '\n';
    return 0;
  }
  if (dist_only) cases.clear();
  if (!o.config.empty() && !dist_only) {
    std::vector<BenchCase> pick;
    for (const auto& c : cases)
      if (c.name == o.config || c.group == o.config) pick.push_back(c);
    if (pick.empty()) {
      std::string names;
      for (const auto& c : cases) names += (names.empty() ? "" : ", ") + c.name;
      throw Error("--config: unknown configuration '" + o.config + "' (expected one of " + names +
                  ", B3, E-sweep, real or dist)");
    }
    cases = pick;
  }
  if (precision)
    for (BenchCase& c : cases) c.cfg.precision = *precision;
  const bool peer_ok = !o.no_peer && python_has_torch();
  const std::string peer_na = o.no_peer ? "n/a (--no-peer)" : "n/a (no torch)";

  std::vector<Result> results;
  std::unique_ptr<perf::ReadRoof> mem_roof;
  for (const BenchCase& c : cases) {
    Result r;
    r.c = c;
    const auto avail = static_cast<double>(mem_available_bytes()) * o.mem_fraction;
    const auto need_fwd = static_cast<double>(bytes_needed(c, false));
    const auto need = static_cast<double>(bytes_needed(c, c.backward));
    const auto gib = [](double b) { return fmt(b / 1073741824.0, 1) + " GiB"; };
    if (need > avail && need_fwd <= avail) {
      // The forward alone fits (the layer allocates gradients on the first backward).
      r.c.backward = false;
      r.note = "forward only: with gradients it needs ~" + gib(need) + ", " + gib(avail) +
               " usable of the memory available";
      std::cerr << "bench: " << c.name << " " << r.note << '\n';
    } else if (need > avail) {
      r.note = "needs ~" + gib(need) + " (parameters, " + (c.backward ? "gradients, " : "") +
               "activations), " + gib(avail) + " usable of the memory available";
      std::cerr << "bench: " << c.name << " skipped: " << r.note << '\n';
      results.push_back(r);
      continue;
    }
    std::cerr << "bench: " << c.name << " (T=" << c.T << ", E=" << c.cfg.n_experts
              << ", d=" << c.cfg.d_model << ", d_ff=" << c.cfg.hidden() << ")...\n";
    run_layer(r, o, mem_roof);
    if (!r.note.empty()) {
      r.peer_note = "n/a (" + r.note + ")";
    } else if (!peer_ok) {
      r.peer_note = peer_na;
    } else if (static_cast<double>(bytes_needed(c, c.backward)) >
               static_cast<double>(mem_available_bytes()) * o.mem_fraction) {
      r.peer_note = "n/a (not enough memory for the peer)";
    } else {
      std::cerr << "bench: " << c.name << " PyTorch peer...\n";
      run_peer(r, o, threads);
    }
    if (o.json_out) std::cout << to_json(r, threads, o.repeat).dump() << std::endl;
    results.push_back(r);
  }
  std::vector<DistResult> dist;
  if ((o.config.empty() || dist_only) && !o.no_dist && !precision)
    for (int P : {2, 4}) {
      std::cerr << "bench: expert parallelism on loopback, P=" << P << "...\n";
      dist.push_back(run_dist(P, o.quick));
    }
  const auto goals = evaluate_goals(results);
  if (o.json_out) {
    for (const Result& r : results)
      if (!r.ran) std::cout << to_json(r, threads, o.repeat).dump() << std::endl;
    for (const DistResult& d : dist) {
      json j = d.res.is_object() ? d.res : json::object();
      j["name"] = "dist-P" + std::to_string(d.P);
      if (!d.note.empty()) j["note"] = d.note;
      std::cout << j.dump() << std::endl;
    }
    print_goals(goals, std::cerr);
  } else {
    std::cout << "moe bench: " << threads << " thread(s), median of " << o.repeat
              << " repeat(s)" << (o.quick ? ", --quick sizes" : "") << ", load average "
              << fmt(load_average(), 2) << " at the end on " << std::thread::hardware_concurrency()
              << " CPU(s)\n";
    print_table(results, std::cout);
    std::cout << '\n';
    print_goals(goals, std::cout);
    if (!dist.empty()) {
      std::cout << "\nExpert parallelism on loopback (mpirun, 1 thread per rank; "
                   "docs/scaling.md has the model for real interconnects)\n"
                   "| P | tokens/rank | step ms | inside MPI | comm share | rows sent/rank B | "
                   "model B |\n|---|---|---|---|---|---|---|\n";
      for (const DistResult& d : dist) {
        if (!d.note.empty()) {
          std::cout << "| " << d.P << " | " << d.note << " | | | | | |\n";
          continue;
        }
        const json& r = d.res;
        std::cout << "| " << d.P << " | " << r.value("tokens_per_rank", 0) << " | "
                  << fmt(1e3 * r.value("step_seconds", 0.0), 1) << " | "
                  << fmt(1e3 * r.value("mpi_seconds", 0.0), 1) << " ms | "
                  << fmt(100.0 * r.value("comm_share", 0.0), 1) << "% | "
                  << fmt(r.value("row_bytes_sent_per_rank", 0.0), 0) << " | "
                  << fmt(r.value("row_bytes_model", 0.0), 0) << " |\n";
      }
    }
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, int& status) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "bench", "Benchmark the MoE layer (B1, B2, B3, E-sweep, real-model blocks) against the "
               "oneDNN GEMM roof of its precision, the memory roof and the PyTorch peer, and "
               "check the goals.");
  sub->add_option("--threads", o->threads, "OpenMP threads (default: OMP_NUM_THREADS or all)")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--config", o->config,
                  "Run one configuration (B1, B2, B3-T1, B3-T4, B3-T16, E8, E64, E256, E1024, "
                  "Qwen3-30B-A3B, Mixtral-8x7B) or a group (B3, E-sweep, real), or dist (only "
                  "the expert-parallel rows), or module (moe.torch.MoE's overhead over the "
                  "bare library at B1)");
  sub->add_option("--precision", o->precision,
                  "fp32 | bf16: run the configurations in this precision (default: fp32, and "
                  "bf16 for the real-model blocks). Alone, bf16 runs B1, B3-T1 and the "
                  "real-model blocks against the bf16 roof and a bf16 PyTorch peer")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  sub->add_option("--repeat", o->repeat, "Timed repeats per measurement; the median is kept")
      ->check(CLI::PositiveNumber);
  sub->add_flag("--no-peer", o->no_peer, "Do not run the PyTorch peer");
  sub->add_flag("--no-dist", o->no_dist,
                "Do not run the expert-parallel rows (mpirun -np 2 and 4 of moe_dist_bench)");
  sub->add_flag("--quick", o->quick, "Small sizes: a smoke test that runs in seconds");
  sub->add_flag("--json", o->json_out,
                "One JSON object per configuration on stdout (goals go to stderr)");
  sub->add_option("--peer-script", o->peer_script,
                  "Path of moe_peer.py (default: bench/peers/moe_peer.py of the source tree)");
  sub->add_option("--mem-fraction", o->mem_fraction,
                  "Skip a configuration that needs more than this share of MemAvailable")
      ->check(CLI::Range(0.05, 1.0));
  sub->footer(
      "Every figure is measured in this run beside its roof. The peer runs under MOE_PYTHON, "
      "else the project's .venv/bin/python, else /usr/bin/python3, with "
      "OPENBLAS_CORETYPE=Cooperlake, when torch is installed there.");
  sub->callback([o, &status] { status = run_bench(*o); });
}

}  // namespace moe::cli
