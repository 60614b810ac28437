// MoEConfig: parsing of the enum names, validation once at the boundary, capacity.
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/check.hpp"
#include "common/cpu.hpp"
#include "experts/int8.hpp"
#include "moe/layer.hpp"
#include "router/expert_choice.hpp"

namespace moe {

using detail::cat;

ExpertKind parse_expert_kind(const std::string& s) {
  if (s == "linear_relu") return ExpertKind::linear_relu;
  if (s == "mlp") return ExpertKind::mlp;
  if (s == "swiglu") return ExpertKind::swiglu;
  if (s == "clamped_swiglu") return ExpertKind::clamped_swiglu;
  throw Error(cat("expert: unknown kind '", s,
                  "' (expected linear_relu, mlp, swiglu or clamped_swiglu)"));
}
Activation parse_activation(const std::string& s) {
  if (s == "relu") return Activation::relu;
  if (s == "gelu") return Activation::gelu;
  if (s == "silu") return Activation::silu;
  throw Error(cat("activation: unknown value '", s, "' (expected relu, gelu or silu)"));
}
DropPolicy parse_drop_policy(const std::string& s) {
  if (s == "position") return DropPolicy::position;
  if (s == "probs") return DropPolicy::probs;
  if (s == "random") return DropPolicy::random;
  if (s == "priority") return DropPolicy::priority;
  throw Error(cat("drop_policy: unknown value '", s,
                  "' (expected position, probs, random or priority)"));
}
RouterKind parse_router_kind(const std::string& s) {
  if (s == "topk_softmax") return RouterKind::topk_softmax;
  if (s == "softmax_topk") return RouterKind::softmax_topk;
  if (s == "sigmoid") return RouterKind::sigmoid;
  if (s == "expert_choice") return RouterKind::expert_choice;
  throw Error(cat("router: unknown value '", s,
                  "' (expected topk_softmax, softmax_topk, sigmoid or expert_choice)"));
}
AuxLossKind parse_aux_loss(const std::string& s) {
  if (s == "switch") return AuxLossKind::switch_lb;
  if (s == "seq") return AuxLossKind::seq;
  if (s == "global") return AuxLossKind::global;
  if (s == "shazeer") return AuxLossKind::shazeer;
  if (s == "none") return AuxLossKind::none;
  throw Error(cat("aux_loss: unknown value '", s,
                  "' (expected switch, seq, global, shazeer or none)"));
}
SecondExpertPolicy parse_second_expert_policy(const std::string& s) {
  if (s == "all") return SecondExpertPolicy::all;
  if (s == "random") return SecondExpertPolicy::random;
  throw Error(cat("second_expert_policy: unknown value '", s, "' (expected all or random)"));
}
Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "bf16") return Precision::bf16;
  if (s == "int8") return Precision::int8;
  if (s == "int4") return Precision::int4;
  if (s == "mxfp4") return Precision::mxfp4;
  if (s == "fp8") return Precision::fp8;
  throw Error(cat("precision: unknown value '", s,
                  "' (expected fp32, bf16, int8, int4, mxfp4 or fp8)"));
}
const char* to_string(Precision v) {
  switch (v) {
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::int8: return "int8";
    case Precision::int4: return "int4";
    case Precision::mxfp4: return "mxfp4";
    case Precision::fp8: return "fp8";
  }
  return "?";
}
const char* to_string(ExpertKind v) {
  switch (v) {
    case ExpertKind::linear_relu: return "linear_relu";
    case ExpertKind::mlp: return "mlp";
    case ExpertKind::swiglu: return "swiglu";
    case ExpertKind::clamped_swiglu: return "clamped_swiglu";
  }
  return "?";
}
const char* to_string(Activation v) {
  return v == Activation::relu ? "relu" : v == Activation::gelu ? "gelu" : "silu";
}
const char* to_string(DropPolicy v) {
  switch (v) {
    case DropPolicy::position: return "position";
    case DropPolicy::probs: return "probs";
    case DropPolicy::random: return "random";
    case DropPolicy::priority: return "priority";
  }
  return "?";
}
const char* to_string(RouterKind v) {
  switch (v) {
    case RouterKind::topk_softmax: return "topk_softmax";
    case RouterKind::softmax_topk: return "softmax_topk";
    case RouterKind::sigmoid: return "sigmoid";
    case RouterKind::expert_choice: return "expert_choice";
  }
  return "?";
}
const char* to_string(AuxLossKind v) {
  switch (v) {
    case AuxLossKind::switch_lb: return "switch";
    case AuxLossKind::seq: return "seq";
    case AuxLossKind::global: return "global";
    case AuxLossKind::shazeer: return "shazeer";
    case AuxLossKind::none: return "none";
  }
  return "?";
}
const char* to_string(SecondExpertPolicy v) {
  return v == SecondExpertPolicy::all ? "all" : "random";
}

RouterConfig MoEConfig::router() const {
  RouterConfig r;
  r.d_model = d_model;
  r.n_experts = n_experts;
  r.k = k;
  r.noise = noise;
  r.noise_scale = noise_scale;
  r.noise_stddev = noise_stddev;
  r.tie_break = tie_break;
  r.use_bias = router_bias;
  r.kind = router_kind;
  r.renormalize = renormalize;
  r.scaling_factor = scaling_factor;
  r.n_groups = n_groups;
  r.topk_groups = topk_groups;
  r.group_score = group_score;
  r.jitter = jitter;
  r.round_logits = round_router_logits;
  r.round_weights = round_gate_weights;
  return r;
}

void MoEConfig::validate() const {
  detail::check_cpu_settings();  // MOE_MAX_ISA, MOE_AMX_MIN_ROWS
  MOE_REQUIRE(d_model >= 1, "d_model: must be at least 1, got ", d_model);
  MOE_REQUIRE(n_experts >= 1, "n_experts: must be at least 1, got ", n_experts);
  MOE_REQUIRE(k >= 1 && k <= n_experts, "k: must be in 1..", n_experts, " (n_experts), got ", k);
  MOE_REQUIRE(d_ff >= 0, "d_ff: must be >= 0 (0 means 4*d_model), got ", d_ff);
  MOE_REQUIRE(d_out >= 0, "d_out: must be >= 0 (0 means d_model), got ", d_out);
  if (capacity_factor)
    MOE_REQUIRE(std::isfinite(*capacity_factor) && *capacity_factor > 0.0,
                "capacity_factor: must be finite and > 0 (omit it for dropless), got ",
                *capacity_factor);
  MOE_REQUIRE(std::isfinite(noise_stddev) && noise_stddev >= 0.0f,
              "noise_stddev: must be finite and >= 0, got ", noise_stddev);
  MOE_REQUIRE(std::isfinite(aux_alpha) && aux_alpha >= 0.0f,
              "aux_alpha: must be finite and >= 0, got ", aux_alpha);
  MOE_REQUIRE(std::isfinite(z_alpha) && z_alpha >= 0.0f, "z_alpha: must be finite and >= 0, got ",
              z_alpha);
  MOE_REQUIRE(std::isfinite(router_init_std) && router_init_std >= 0.0f,
              "router_init_std: must be finite and >= 0, got ", router_init_std);
  MOE_REQUIRE(!residual || out_dim() == d_model, "residual: needs d_out == d_model (", d_model,
              "), got d_out ", out_dim());
  // Slot indices are int32 and buffers are sized by products of these widths.
  constexpr int64_t kMaxWidth = int64_t{1} << 24;
  MOE_REQUIRE(d_model <= kMaxWidth, "d_model: too large, got ", d_model);
  MOE_REQUIRE(hidden() <= kMaxWidth, "d_ff: too large, got ", hidden());
  MOE_REQUIRE(shared_hidden() <= kMaxWidth, "shared_d_ff: too large, got ", shared_hidden());
  MOE_REQUIRE(out_dim() <= kMaxWidth, "d_out: too large, got ", out_dim());
  MOE_REQUIRE(std::isfinite(swiglu_alpha) && swiglu_alpha > 0.0f,
              "swiglu_alpha: must be finite and > 0, got ", swiglu_alpha);
  MOE_REQUIRE(std::isfinite(swiglu_limit) && swiglu_limit > 0.0f,
              "swiglu_limit: must be finite and > 0, got ", swiglu_limit);
  MOE_REQUIRE(shared_d_ff >= 0, "shared_d_ff: must be >= 0 (0 means d_ff), got ", shared_d_ff);
  MOE_REQUIRE(shared_d_ff == 0 || n_shared_experts > 0,
              "shared_d_ff: needs n_shared_experts > 0, got shared_d_ff ", shared_d_ff);
  MOE_REQUIRE(shared_d_ff == 0 || expert != ExpertKind::linear_relu,
              "shared_d_ff: linear_relu experts have no hidden width, got shared_d_ff ",
              shared_d_ff);
  // int8 sums are exact in int32 up to this width (experts/int8.hpp).
  MOE_REQUIRE(precision != Precision::int8 ||
                  std::max({d_model, hidden(), shared_hidden(), out_dim()}) <= detail::kInt8MaxWidth,
              "precision: 'int8' needs d_model, d_ff and d_out <= ", detail::kInt8MaxWidth,
              ", got ", d_model, ", ", hidden(), ", ", out_dim());
  MOE_REQUIRE(int4_group == 32 || int4_group == 64 || int4_group == 128,
              "int4_group: must be 32, 64 or 128, got ", int4_group);
  router().validate();
  validate_router_family();
  // Each width may be fine on its own while their product overflows int64 (and every
  // Tensor size after it). Count the parameters with saturating arithmetic and refuse
  // more than 2^40 floats (4 TiB), far beyond any machine, before anything is allocated.
  constexpr int64_t kMaxParams = int64_t{1} << 40;
  auto mul = [](int64_t a, int64_t b) {
    int64_t r = 0;
    return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
  };
  auto add = [](int64_t a, int64_t b) {
    int64_t r = 0;
    return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
  };
  // An upper bound over every kind: W_g, W_noise, b_g, then W1, W3, W2, b1, b3, b2 per expert
  // of hidden width F (the shared experts' is shared_hidden()).
  auto per_expert = [&](int64_t F) {
    return add(add(mul(F, add(mul(2, d_model), out_dim())), mul(2, F)),
               add(out_dim(), add(mul(2, d_model), 1)));
  };
  const int64_t total = add(mul(n_experts, per_expert(hidden())),
                            mul(n_shared_experts, per_expert(shared_hidden())));
  MOE_REQUIRE(total <= kMaxParams, "n_experts, d_model, d_ff, d_out: too large together (",
              n_experts, " experts of ", d_model, "x", hidden(), "x", out_dim(),
              " need more than 2^40 parameters)");
}

void MoEConfig::validate_router_family() const {
  MOE_REQUIRE(std::isfinite(scaling_factor) && scaling_factor > 0.0f,
              "scaling_factor: must be finite and > 0, got ", scaling_factor);
  MOE_REQUIRE(seq_len >= 0, "seq_len: must be >= 0 (0: the whole batch), got ", seq_len);
  MOE_REQUIRE(std::isfinite(bias_update_rate) && bias_update_rate >= 0.0f,
              "bias_update_rate: must be finite and >= 0 (0: off), got ", bias_update_rate);
  MOE_REQUIRE(n_groups >= 1 && n_groups <= n_experts, "n_groups: must be in 1..", n_experts,
              " (n_experts), got ", n_groups);
  MOE_REQUIRE(n_experts % n_groups == 0, "n_groups: must divide n_experts (", n_experts,
              "), got ", n_groups);
  MOE_REQUIRE(topk_groups >= 1 && topk_groups <= n_groups, "topk_groups: must be in 1..",
              n_groups, " (n_groups), got ", topk_groups);
  if (n_groups > 1)
    MOE_REQUIRE(k <= topk_groups * (n_experts / n_groups), "k: must be at most topk_groups * ",
                "experts per group (", topk_groups * (n_experts / n_groups), "), got ", k);
  MOE_REQUIRE(n_shared_experts >= 0 && n_shared_experts <= 1024,
              "n_shared_experts: must be in 0..1024, got ", n_shared_experts);
  MOE_REQUIRE(!shared_gate || n_shared_experts > 0,
              "shared_gate: needs n_shared_experts > 0");
  MOE_REQUIRE(std::isfinite(jitter) && jitter >= 0.0f && jitter < 1.0f,
              "jitter: must be in [0, 1), got ", jitter);
  MOE_REQUIRE(second_expert_policy == SecondExpertPolicy::all || k == 2,
              "second_expert_policy: 'random' needs k == 2 (GShard top-2), got k = ", k);
  MOE_REQUIRE(!renormalize || router_kind == RouterKind::softmax_topk ||
                  router_kind == RouterKind::sigmoid,
              "renormalize: applies to router softmax_topk or sigmoid, not ",
              to_string(router_kind));
  MOE_REQUIRE(tie_break != TieBreak::torch || (n_groups == 1 &&
                                                 router_kind != RouterKind::expert_choice),
              "tie_break: 'torch' applies to token-choice routing without groups (n_groups 1), "
              "not router ", to_string(router_kind), " with n_groups ", n_groups);
  MOE_REQUIRE(!round_each_op || precision == Precision::bf16,
              "round_each_op: rounds each step of the bf16 experts; needs precision bf16, not ",
              to_string(precision));
  detail::validate_expert_choice(*this);
}

int64_t MoEConfig::capacity(int64_t T) const {
  if (!capacity_factor) return -1;
  if (T <= 0) return 0;
  // k·T·cf/E in double. Decimal factors are not exact in binary (1.1·10 = 11.000000000000002),
  // so a value within a relative 1e-9 of a positive integer is taken as that integer before
  // rounding up; otherwise ceil would hand out one slot more than the formula means.
  const double v = static_cast<double>(k) * static_cast<double>(T) * *capacity_factor /
                   static_cast<double>(n_experts);
  const double r = std::round(v);
  if (r >= 1.0 && std::abs(v - r) <= 1e-9 * r) return static_cast<int64_t>(r);
  const double c = std::ceil(v);
  // Huge factors: keep the value representable (any C >= T means nothing is dropped).
  constexpr double kMax = 4.0e18;
  return c >= kMax ? static_cast<int64_t>(kMax) : static_cast<int64_t>(c);
}

}  // namespace moe
