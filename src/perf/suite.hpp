// The benchmark configurations (B1, B2, B3, E-sweep, real-model shapes) and how their FLOPs
// are counted. `moe bench` and the Google Benchmark programs both take their shapes from here.
//
// FLOP counting (docs/benchmarks.md says the same): one multiply-add is 2 FLOPs, and only the
// matrix products are counted.
// - Experts, per routed row (rows = T·k, nominal: dropped assignments are still counted, as
//   the roof GEMM [T·k, d] × [d, d_ff] counts them):
//     linear_relu 2·d·d_out;  mlp 2·(d·d_ff + d_ff·d_out);  swiglu 2·(2·d·d_ff + d_ff·d_out).
// - Router: 2·T·d·E for the logits, doubled when learned noise is applied (training only),
//   since x·W_noise is a second product of the same shape.
// - Forward + backward: 3× the forward (each product has two of the same size in backward:
//   the input gradient and the weight gradient).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/layer.hpp"

namespace moe::perf {

struct BenchCase {
  std::string name;   // "B1", "B2", "B3-T1", "E8", ...
  std::string group;  // "B1", "B2", "B3", "E-sweep"
  MoEConfig cfg;
  int64_t T = 0;
  bool training = true;  // forward in training mode (noise on, state saved for backward)
  bool backward = true;  // forward+backward measured too
  bool memory_roof = false;  // decode: the roof is the read bandwidth, not the GEMM rate
  // Real-model shapes, whose weights come from memory on every forward: the roof is the
  // larger of the FLOPs at the GEMM rate and the selected experts' bytes at the read
  // bandwidth, both measured beside each sample.
  bool weights_roof = false;
  // A block of a checkpoint (`moe bench --model`, group "real-models"): the layer is
  // load_pretrained(model_dir, model_layer, cfg.precision), cfg is its pretrained_config.
  std::string model_dir;
  int64_t model_layer = -1;
  // `--precision auto`: the block's experts as the folder stores them, in words (cfg.precision
  // is the precision that keeps them); empty when the precision was asked for by name.
  std::string stored_format;
};

// Every configuration, in order: B1, B2, B3-T{1,4,16}, the E-sweep, and the real-model
// shapes (group "real": Qwen3-30B-A3B's and Mixtral-8x7B's MoE blocks with random weights).
// quick: the same structure at small sizes (a smoke test that runs in seconds).
std::vector<BenchCase> bench_cases(bool quick);

// The configurations `moe bench` runs by default: all but the real-model shapes in fp32;
// with precision bf16, B1, B3-T1 and the real-model shapes, in bf16; with int8 (evaluation
// only), B3-T{1,4,16} and the real-model shapes, in int8.
std::vector<BenchCase> default_cases(bool quick, Precision p);

// Forward FLOPs of the experts on `rows` routed rows.
double expert_flops(const MoEConfig& cfg, int64_t rows);
// Forward FLOPs of the router on T tokens.
double router_flops(const MoEConfig& cfg, int64_t T, bool training);
// Forward FLOPs of the layer: experts on T·k rows plus the router.
double layer_flops_fwd(const BenchCase& c);
// Bytes of one expert's weights (and biases): what a decode step reads per selected expert.
int64_t expert_weight_bytes(const MoEConfig& cfg);
// Bytes a forward reads per selected expert in cfg.precision: the weight matrices at 2
// bytes a value in bf16 (their copies), at 1 in int8 plus 8 bytes per output column (its
// scale and column sum); biases at 4.
int64_t expert_read_bytes(const MoEConfig& cfg);
// Bytes of all parameters of the layer (router, noise, experts).
int64_t layer_param_bytes(const MoEConfig& cfg);

}  // namespace moe::perf
