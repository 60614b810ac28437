// `moe bench`, split by what it measures: the layer against its roofs (bench_layer.cpp), the
// PyTorch peers and moe.torch's overhead (bench_peers.cpp), expert parallelism under mpirun
// (bench_dist.cpp), the JSON, table and goals (bench_report.cpp), the heap accounting that
// replaces the binary's operator new (bench_heap.cpp); cmd_bench.cpp runs them.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/layer.hpp"
#include "perf/roofline.hpp"
#include "perf/suite.hpp"

#ifndef MOE_SOURCE_DIR
#define MOE_SOURCE_DIR "."
#endif

namespace moe::cli::bench {

using json = nlohmann::json;
using perf::BenchCase;

// A window of heap accounting (bench_heap.cpp): peak and largest allocation since start(),
// relative to the bytes live at start().
struct HeapWindow {
  int64_t base = 0, count0 = 0;
  void start();
  int64_t peak() const;
  int64_t live() const;
  int64_t largest() const;
  int64_t allocs() const;
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
  std::string model;      // --model: a Hugging Face folder whose block is benchmarked
  int64_t layer = -1;     // --layer of --model
  int64_t tokens = 512;   // --tokens: the prefill row's T (a decode row at T = 1 follows)
  std::string workdir;    // --workdir: where --config real-models writes its checkpoints
};

// Load time of one block against the time to read its bytes from disk (both after dropping
// the files from the page cache), medians.
struct LoadTiming {
  double load_s = 0, read_s = 0;
  // Allocating and first touching as many bytes of new memory as were read, the way the layer
  // allocates its packed weights: a load must do this too, and in a virtual machine whose host
  // backs memory lazily it can take longer than the disk.
  double touch_s = 0;
  int64_t bytes = 0;
  std::string note;
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
  std::optional<LoadTiming> load;  // checkpoint rows: the block's load time
};

struct Goal {
  std::string text;
  std::optional<bool> met;  // nullopt: not measured in this run
  std::string detail;
};

// bench_layer.cpp: the layer beside its roofs.
int64_t mem_available_bytes();
int64_t bytes_needed(const BenchCase& c, bool with_grads);
void run_layer(Result& r, const BenchOptions& o, std::unique_ptr<perf::ReadRoof>& mem_roof);

// bench_peers.cpp: the PyTorch peer of a configuration, moe.torch's overhead.
std::string peer_python();
bool python_has_torch();
std::string shell_quote(const std::string& s);
json run_json_command(const std::string& cmd, int& rc);
void run_peer(Result& r, const BenchOptions& o, int threads);
std::vector<json> run_module_overhead(const BenchOptions& o, int threads, std::string& note);

// bench_model.cpp: checkpoint blocks (--model, --config real-models).
std::vector<BenchCase> model_cases(const std::string& dir, int64_t layer, int64_t T, Precision p,
                                   const std::string& label);
// A random checkpoint of `model` in parent/<model> (parent/<model>-quick with quick: the same
// structure at 1/16 of d and d_ff), written by bench/peers/make_checkpoint.py unless present.
std::string make_checkpoint(const std::string& model, const std::string& parent, bool quick,
                            std::string& note);
void run_hf_peer(Result& r, const BenchOptions& o, int threads);
LoadTiming measure_load(const std::string& dir, int64_t layer, Precision p, int repeat);

// bench_dist.cpp: expert parallelism on loopback.
DistResult run_dist(int P, bool quick);

// bench_report.cpp: what is printed.
double load_average();
std::string fmt(double v, int prec);
std::string fmt(const std::optional<double>& v, int prec, const std::string& na = "-");
std::optional<double> ratio(const std::optional<double>& num, const std::optional<double>& den);
json to_json(const Result& r, int threads, int repeat);
void print_table(const std::vector<Result>& rs, std::ostream& os);
std::vector<Goal> evaluate_goals(const std::vector<Result>& rs);
void print_goals(const std::vector<Goal>& goals, std::ostream& os);

}  // namespace moe::cli::bench
