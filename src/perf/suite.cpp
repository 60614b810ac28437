#include "perf/suite.hpp"
#include "experts/lowbit.hpp"

#include <cmath>
#include <cstdio>

namespace moe::perf {

namespace {

// snprintf rather than string concatenation: GCC 12 warns falsely (-Wrestrict) on the
// inlined std::string copies of "E" + std::to_string(E).
std::string label(const char* prefix, int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s%lld", prefix, static_cast<long long>(v));
  return buf;
}

// B1: T=4096, d=1024, d_ff=2048, E=16, k=2, mlp relu, cf=1.25, learned noise.
BenchCase b1(bool quick) {
  BenchCase c;
  c.name = c.group = "B1";
  c.T = quick ? 256 : 4096;
  MoEConfig& m = c.cfg;
  m.d_model = quick ? 64 : 1024;
  m.d_ff = quick ? 128 : 2048;
  m.n_experts = quick ? 8 : 16;
  m.k = 2;
  m.expert = ExpertKind::mlp;
  m.activation = Activation::relu;
  m.capacity_factor = 1.25;
  m.noise = Noise::learned;
  // A router that starts at zero sends every token by noise alone; a trained router has
  // logits of order one, which 1/sqrt(d) gives for unit inputs.
  m.router_init_std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.d_model)));
  m.seed = 1;
  return c;
}

}  // namespace

std::vector<BenchCase> bench_cases(bool quick) {
  std::vector<BenchCase> out;
  out.push_back(b1(quick));

  // B2: B1 with E=256, d_ff=512 (fine-grained experts).
  BenchCase c2 = b1(quick);
  c2.name = c2.group = "B2";
  c2.cfg.n_experts = quick ? 32 : 256;
  c2.cfg.d_ff = quick ? 32 : 512;
  out.push_back(c2);

  // B3: decode, T in {1, 4, 16}, d=4096, d_ff=14336, swiglu, E=8, k=2, evaluation mode.
  // Inference routes without noise and without a capacity limit (nothing is dropped).
  for (int64_t T : {1, 4, 16}) {
    BenchCase c;
    c.name = label("B3-T", T);
    c.group = "B3";
    c.T = T;
    c.training = false;
    c.backward = false;
    c.memory_roof = true;
    MoEConfig& m = c.cfg;
    m.d_model = quick ? 128 : 4096;
    m.d_ff = quick ? 256 : 14336;
    m.n_experts = 8;
    m.k = 2;
    m.expert = ExpertKind::swiglu;
    m.activation = Activation::silu;
    m.expert_bias = false;
    m.capacity_factor.reset();
    m.noise = Noise::none;
    m.router_init_std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.d_model)));
    m.seed = 3;
    out.push_back(c);
  }

  // E-sweep: B1 with E in {8, 64, 256, 1024}. T, k, d and d_ff stay B1's, so the routed
  // FLOPs 2·T·k·(d·d_ff + d_ff·d) are the same at every E; only the number of experts (and
  // so rows per expert, T·k/E) changes.
  for (int64_t E : {8, 64, 256, 1024}) {
    BenchCase c = b1(quick);
    c.name = label("E", E);
    c.group = "E-sweep";
    c.cfg.n_experts = E;
    out.push_back(c);
  }

  // Real-model MoE blocks with random weights, evaluation, swiglu, softmax over all experts
  // then top-k renormalised, dropless, no noise. Qwen3-30B-A3B: d 2048, 128 experts of width
  // 768, top-8. Mixtral-8x7B: d 4096, 8 experts of width 14336, top-2. Prefill of 512 tokens.
  auto real = [&](const char* name, int64_t d, int64_t f, int64_t E, int64_t k) {
    BenchCase c;
    c.name = name;
    c.group = "real";
    c.T = quick ? 32 : 512;
    c.training = false;
    c.backward = false;
    c.weights_roof = true;
    MoEConfig& m = c.cfg;
    m.d_model = quick ? d / 32 : d;
    m.d_ff = quick ? f / 32 : f;
    m.n_experts = E;
    m.k = k;
    m.expert = ExpertKind::swiglu;
    m.activation = Activation::silu;
    m.expert_bias = false;
    m.capacity_factor.reset();
    m.noise = Noise::none;
    m.router_kind = RouterKind::softmax_topk;
    m.renormalize = true;
    m.aux_alpha = 0.0f;
    m.router_init_std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.d_model)));
    m.seed = 5;
    m.precision = Precision::bf16;
    out.push_back(c);
  };
  real("Qwen3-30B-A3B", 2048, 768, 128, 8);
  real("Mixtral-8x7B", 4096, 14336, 8, 2);
  return out;
}

std::vector<BenchCase> default_cases(bool quick, Precision p) {
  std::vector<BenchCase> out;
  for (BenchCase c : bench_cases(quick)) {
    if (p == Precision::fp32 && c.group != "real") out.push_back(c);
    if (evaluation_only(p)) {  // int8, int4, mxfp4, fp8: decode at T = 1, 4, 16 and prefill
      if (c.group == "B3" || c.group == "real") {
        c.cfg.precision = p;
        out.push_back(c);
      }
      continue;
    }
    if (p != Precision::fp32 && (c.name == "B1" || c.name == "B3-T1" || c.group == "real")) {
      c.cfg.precision = p;
      out.push_back(c);
    }
  }
  return out;
}

double expert_flops(const MoEConfig& cfg, int64_t rows) {
  const double d = static_cast<double>(cfg.d_model), f = static_cast<double>(cfg.hidden()),
               o = static_cast<double>(cfg.out_dim()), r = static_cast<double>(rows);
  switch (cfg.expert) {
    case ExpertKind::linear_relu: return 2.0 * r * d * o;
    case ExpertKind::mlp: return 2.0 * r * (d * f + f * o);
    case ExpertKind::swiglu:
    case ExpertKind::clamped_swiglu: return 2.0 * r * (2.0 * d * f + f * o);
  }
  return 0.0;
}

double router_flops(const MoEConfig& cfg, int64_t T, bool training) {
  const double base = 2.0 * static_cast<double>(T) * static_cast<double>(cfg.d_model) *
                      static_cast<double>(cfg.n_experts);
  return training && cfg.noise == Noise::learned ? 2.0 * base : base;
}

double layer_flops_fwd(const BenchCase& c) {
  return expert_flops(c.cfg, c.T * c.cfg.k) + router_flops(c.cfg, c.T, c.training);
}

int64_t expert_weight_bytes(const MoEConfig& cfg) {
  const int64_t d = cfg.d_model, f = cfg.hidden(), o = cfg.out_dim();
  int64_t n = 0;
  switch (cfg.expert) {
    case ExpertKind::linear_relu: n = d * o + (cfg.expert_bias ? o : 0); break;
    case ExpertKind::mlp: n = d * f + f * o + (cfg.expert_bias ? f + o : 0); break;
    case ExpertKind::swiglu: n = 2 * d * f + f * o; break;
    case ExpertKind::clamped_swiglu:
      n = 2 * d * f + f * o + (cfg.expert_bias ? 2 * f + o : 0);
      break;
  }
  return n * static_cast<int64_t>(sizeof(float));
}

int64_t expert_read_bytes(const MoEConfig& cfg) {
  const int64_t all = expert_weight_bytes(cfg);
  if (cfg.precision == Precision::fp32) return all;
  const int64_t f = cfg.hidden(), o = cfg.out_dim();
  int64_t bias = 0;
  if (cfg.expert_bias && cfg.expert == ExpertKind::linear_relu) bias = o;
  if (cfg.expert_bias && cfg.expert == ExpertKind::mlp) bias = f + o;
  if (cfg.expert_bias && cfg.expert == ExpertKind::clamped_swiglu) bias = 2 * f + o;
  bias *= static_cast<int64_t>(sizeof(float));
  if (cfg.precision == Precision::bf16) return (all - bias) / 2 + bias;
  if (low_bit(cfg.precision)) {  // the stored bytes of each matrix (experts/lowbit.hpp)
    const detail::Int4Options opt{cfg.int4_group, cfg.int4_zero_points, true};
    const int64_t d = cfg.d_model;
    const auto m = [&](int64_t K, int64_t N) {
      return detail::lowbit_matrix_bytes(cfg.precision, opt, K, N);
    };
    switch (cfg.expert) {
      case ExpertKind::linear_relu: return m(d, o) + bias;
      case ExpertKind::mlp: return m(d, f) + m(f, o) + bias;
      case ExpertKind::swiglu:
      case ExpertKind::clamped_swiglu: return 2 * m(d, f) + m(f, o) + bias;
    }
  }
  // int8: a byte a weight, and per output column a scale and a column sum (4 bytes each).
  int64_t cols = 0;
  switch (cfg.expert) {
    case ExpertKind::linear_relu: cols = o; break;
    case ExpertKind::mlp: cols = f + o; break;
    case ExpertKind::swiglu:
    case ExpertKind::clamped_swiglu: cols = 2 * f + o; break;
  }
  return (all - bias) / 4 + bias + 8 * cols;
}

int64_t layer_param_bytes(const MoEConfig& cfg) {
  const int64_t router = cfg.d_model * cfg.n_experts * (cfg.noise == Noise::learned ? 2 : 1) +
                         (cfg.router_bias ? cfg.n_experts : 0);
  return router * static_cast<int64_t>(sizeof(float)) + cfg.n_experts * expert_weight_bytes(cfg);
}

}  // namespace moe::perf
