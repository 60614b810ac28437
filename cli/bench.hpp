// `moe bench`, split by what it measures: the layer against its roofs (bench_layer.cpp), the
// PyTorch peers and moe.torch's overhead (bench_peers.cpp), expert parallelism under mpirun
// (bench_dist.cpp), generation with a transformers model (bench_generate.cpp), the JSON, table
// and goals (bench_report.cpp), the heap accounting that replaces the binary's operator new
// (bench_heap.cpp); cmd_bench.cpp runs them.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/layer.hpp"
#include "perf/machine.hpp"
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
  bool no_kt = false;     // --no-kt: do not run the kt-kernel peer
  std::string kt_python;  // --kt-python: the interpreter with kt-kernel (default kt_python())
  // Cold decode: the copies a decode row rotates over read at least this many times the
  // last-level cache between two calls on the same copy (perf::cold_layer_count).
  double cold_margin = 2.0;
};

// One form of the PyTorch peer (bench/peers/moe_peer.py measures each; the fastest is the peer).
struct PeerForm {
  std::string name;  // "x @ W + b, sorted, bf16 tensors", ...
  std::optional<double> fwd_s, fwdbwd_s;
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
  std::string peer_form, peer_form_fwdbwd;  // the fastest form of the torch peer (each measure)
  std::vector<PeerForm> peer_forms;         // every form it measured
  // Cold decode (memory_roof rows): the layer copies rotated over, the bytes one call reads
  // (the selected experts' weights and the router's) and why the rotation is short, if it is.
  // The peers are given the same count.
  int cold_layers = 1;
  int cold_layers_wanted = 1;
  std::string cold_note;
  // The read roof's pattern (the fastest of perf::read_patterns, chosen once per run).
  std::string read_pattern;
  // The routing libmoe's forward chose on the row's inputs: what the kt-kernel peer is given.
  std::vector<int32_t> route_indices;  // (T, k)
  std::vector<float> route_weights;    // (T, k)
  // kt-kernel (KTransformers) peer: best of the repeats; kt_note says why it did not run
  // ("skipped: ..."); kt_impl names the class, the variant kt-kernel loaded and its version.
  std::optional<double> kt_fwd_s;
  std::string kt_note, kt_impl;
  std::optional<double> kt_check_err;  // its output against a float32 evaluation, relative
  // The formats the peer quantizes itself (mxfp4, fp8): against the weights as quantized.
  std::optional<double> kt_check_err_quantized;
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
// The row's input tokens x (T, d): values in [-1, 1) from a fixed hash.
std::vector<float> bench_input(int64_t T, int64_t d);
void run_layer(Result& r, const BenchOptions& o, std::unique_ptr<perf::ReadRoof>& mem_roof,
               const perf::MachineInfo& machine);

// bench_peers.cpp: the PyTorch peer of a configuration, moe.torch's overhead.
std::string peer_python();
bool python_has_torch();
std::string shell_quote(const std::string& s);
json run_json_command(const std::string& cmd, int& rc);
void run_peer(Result& r, const BenchOptions& o, int threads);
std::vector<json> run_module_overhead(const BenchOptions& o, int threads, std::string& note);

// bench_kt.cpp: the kt-kernel (KTransformers) peer, bench/peers/kt_peer.py under kt_python().
// The interpreter: --kt-python, else MOE_KT_PYTHON, else $MOE_KT_VENV/bin/python, else the
// source tree's .venv-kt/bin/python (scripts/bench_setup.sh makes it).
std::string kt_python(const BenchOptions& o);
// Why the kt-kernel peer does not apply to the row ("" when it does): its precision is fp32
// (kt-kernel runs bf16, int8, int4, mxfp4, fp8), its experts are not plain swiglu without
// biases, it has shared experts, it trains.
std::string kt_not_applicable(const BenchCase& c);
// What kt-kernel offers in this environment ({"ok": true, "variant": ..., "classes": [...]} or
// {"ok": false, "reason": ...}); probed once per run (bench/peers/kt_peer.py --probe).
json kt_probe(const BenchOptions& o);
// Runs the peer for the row (r.route_indices / r.route_weights from run_layer), filling
// kt_fwd_s and kt_impl, or kt_note with "skipped: <reason>".
void run_kt_peer(Result& r, const BenchOptions& o, int threads);

// bench_model.cpp: checkpoint blocks (--model, --config real-models).
std::vector<BenchCase> model_cases(const std::string& dir, int64_t layer, int64_t T, Precision p,
                                   const std::string& label);
// A random checkpoint of `model` in parent/<model> (parent/<model>-quick with quick: the same
// structure at 1/16 of d and d_ff), written by bench/peers/make_checkpoint.py unless present.
std::string make_checkpoint(const std::string& model, const std::string& parent, bool quick,
                            std::string& note);
void run_hf_peer(Result& r, const BenchOptions& o, int threads);
LoadTiming measure_load(const std::string& dir, int64_t layer, Precision p, int repeat);

// bench_generate.cpp: --config generate-qwen3 | generate-gpt-oss, examples/generate.py.
// The script's --model for a generation config ("" for any other config).
std::string generate_model(const std::string& config);
// MOE_GENERATE_SCRIPT, else examples/generate.py of the source tree.
std::string generate_script();
// The script's arguments: --threads, --repeat, --tokens (its --prompt), --precision (its
// --precisions; default bf16,int8,int4,published), --quick (its --tiny sizes), --json.
std::vector<std::string> generate_args(const BenchOptions& o, int threads);
// Runs it, its output on ours; 1 when it fails.
int run_generate(const BenchOptions& o, int threads);

// bench_dist.cpp: expert parallelism on loopback.
DistResult run_dist(int P, bool quick);

// bench_machine.cpp: the report header: the machine (CPU model, ISA flags), its last-level
// cache, the read roof's patterns, and the lines of the kernels libmoe chose.
void print_machine_header(std::ostream& os, const perf::MachineInfo& m,
                          const perf::ReadRoof* roof);
json machine_json(const perf::MachineInfo& m, const perf::ReadRoof* roof);

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
