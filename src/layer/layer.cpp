// The fast MoE layer: router → capacity plan → gather → grouped expert GEMMs → combine, and
// the same chain backwards. Every stage is parallel over rows or tokens and sums in a fixed
// order, so the results are bit-identical for any thread count.
#include "moe/layer.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <new>
#include <stdexcept>

#include <unistd.h>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "dispatch/capacity_plan.hpp"
#include "dispatch/gather_combine.hpp"
#include "experts/experts.hpp"
#include "experts/int8.hpp"
#include "experts/precision.hpp"
#include "layer/expert_choice_layer.hpp"
#include "layer/init.hpp"
#include "layer/layer_access.hpp"
#include "layer/shared_experts.hpp"
#include "common/gemm.hpp"
#include "layer/workspace.hpp"
#include "losses/layer_balance.hpp"
#include "losses/losses.hpp"

namespace moe {

using detail::cat;
using detail::kParallelMin;

namespace {

// Allocations sized by the caller's dimensions. More than the machine's physical memory is
// refused up front: under memory overcommit such an allocation may "succeed" and the
// process be killed when the pages are touched. A failed allocation becomes moe::Error
// instead of std::bad_alloc escaping.
template <typename F>
void allocate_or_throw(const char* what, int64_t floats, F&& alloc) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double need = static_cast<double>(floats) * sizeof(float);
  if (pages > 0 && page > 0) {
    const double have = static_cast<double>(pages) * static_cast<double>(page);
    MOE_REQUIRE(need <= have, what, ": needs ", need / gib, " GiB, more than this machine's ",
                have / gib, " GiB of memory");
  }
  try {
    alloc();
  } catch (const std::bad_alloc&) {
    throw Error(cat(what, ": cannot allocate ", need / gib, " GiB"));
  } catch (const std::length_error&) {
    throw Error(cat(what, ": cannot allocate ", need / gib, " GiB"));
  }
}

}  // namespace

struct MoELayer::Impl {
  MoEConfig cfg;
  RouterConfig rcfg;
  detail::ExpertShape shape;
  std::vector<detail::ParamSpec> specs;
  std::vector<std::string> names;
  std::vector<Tensor> params, grads;
  bool grads_ready = false;  // grads are allocated (ensure_grads)
  std::map<std::string, size_t> index;

  // What forward saves for backward.
  bool have_forward = false;
  // What forward_routed saves for backward_routed (k = 0: nothing saved).
  int64_t routed_k = 0;
  std::vector<float> routed_weights;  // (T, routed_k)
  int64_t T = 0;
  RouterState routing;
  detail::CapacityPlan plan;
  detail::ExpertChoicePlan ec_plan;  // router "expert_choice" instead of plan
  MoEStats stats;
  detail::LayerWorkspace ws;
  detail::GroupedGemm gg;
  detail::BalanceState balance;  // aux_loss kinds: global loads, shazeer scratch
  detail::SharedExperts shared;  // n_shared_experts > 0
  // The routed experts' weights and operands in the layer's precision (bf16, int8).
  detail::ExpertPrecision prec;

  // LayerOptions::masters: false once the expert matrices live only in the layer's precision
  // (then specs/names/params leave them out).
  bool masters = true;

  // Selection bias (bias_update_rate > 0 or selection_bias) and the load that its next
  // update uses (bias_update_rate > 0).
  Tensor sel_bias;
  std::vector<int64_t> bias_load;  // (E), empty when consumed

  const float* p(const char* name) const {
    auto it = index.find(name);
    return it == index.end() ? nullptr : params[it->second].ptr();
  }
  float* g(const char* name) {
    auto it = index.find(name);
    return it == index.end() ? nullptr : grads[it->second].ptr();
  }
  size_t find(const std::string& name) const {
    auto it = index.find(name);
    if (it == index.end()) {
      if (!masters && (name == "W1" || name == "W2" || name == "W3" || name == "Ws1" ||
                       name == "Ws2" || name == "Ws3"))
        throw Error(cat(name, ": not held as an fp32 tensor; this layer keeps its expert "
                        "matrices in ", to_string(cfg.precision), " only (no masters: built "
                        "for evaluation, e.g. by from_pretrained)"));
      std::string known;
      for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
      throw Error(cat("parameter: unknown name '", name, "' (this layer has ", known, ")"));
    }
    return it->second;
  }
  void ensure_grads() {
    if (grads_ready) return;
    int64_t floats = 0;
    for (const auto& spec : specs) floats += Tensor::numel_of(spec.shape);
    allocate_or_throw("gradients", floats, [&] {
      for (size_t i = 0; i < specs.size(); ++i) grads[i] = Tensor(specs[i].shape);
    });
    grads_ready = true;
  }
  RouterParams router_params() const {
    return {p("W_g"), p("b_g"), p("W_noise"),
            cfg.uses_selection_bias() ? sel_bias.ptr() : nullptr};
  }
  detail::ExpertWeights expert_weights() const {
    return {p("W1"), p("b1"), p("W2"), p("b2"), p("W3"), p("b3")};
  }
  detail::ExpertChoiceLayer expert_choice_layer(int64_t T) {
    return {&cfg, &rcfg, &shape, router_params(), expert_weights(), &prec, ws.carve(cfg, T),
            &gg};
  }
  // param() hands out mutable tensors: a caller may have replaced one with a wrong shape.
  void check_params() const {
    for (size_t i = 0; i < specs.size(); ++i)
      MOE_REQUIRE(params[i].shape == specs[i].shape &&
                      params[i].numel() == Tensor::numel_of(specs[i].shape),
                  specs[i].name, ": expected shape ", shape_str(specs[i].shape), " with ",
                  Tensor::numel_of(specs[i].shape), " values, got ", shape_str(params[i].shape),
                  " with ", params[i].numel());
  }
  detail::SharedWeights shared_weights() const {
    return {p("Ws1"), p("bs1"), p("Ws2"), p("bs2"), p("Ws3"), p("w_shared_gate"), p("bs3")};
  }
};

namespace {

// The expert matrices that a layer may hold without fp32 masters (LayerOptions), and which of
// the bf16 copies (1: W1, 2: W2, 3: W3) each one is.
int expert_matrix_slot(const std::string& name) {
  if (name == "W1" || name == "Ws1") return 1;
  if (name == "W2" || name == "Ws2") return 2;
  if (name == "W3" || name == "Ws3") return 3;
  return 0;
}

// The stack that W1 (routed) or Ws1 (shared) starts, as an ExpertShape, from the specs.
detail::ExpertShape stack_shape(const std::vector<detail::ParamSpec>& specs, const MoEConfig& cfg,
                                bool shared) {
  detail::ExpertShape s = detail::ExpertShape::of(cfg);
  for (const auto& spec : specs) {
    if (spec.name == (shared ? "Ws1" : "W1")) {
      s.E = spec.shape[0];
      if (s.kind != ExpertKind::linear_relu) s.F = spec.shape[2];
    }
    if (spec.name == (shared ? "Ws2" : "W2")) s.Do = spec.shape[2];
  }
  return s;
}

}  // namespace

MoELayer::MoELayer(const MoEConfig& cfg) : MoELayer(cfg, LayerOptions{}) {}

MoELayer::MoELayer(const MoEConfig& cfg, const LayerOptions& opt)
    : impl_(std::make_unique<Impl>()) {
  cfg.validate();
  Impl& m = *impl_;
  m.cfg = cfg;
  m.rcfg = cfg.router();
  m.shape = detail::ExpertShape::of(cfg);
  m.prec.configure(cfg);
  m.shared.precision().configure(cfg);
  m.specs = detail::parameter_specs(cfg);
  const std::vector<detail::ParamSpec> all_specs = m.specs;
  m.masters = opt.masters || cfg.precision == Precision::fp32;
  if (!m.masters)
    m.specs.erase(std::remove_if(m.specs.begin(), m.specs.end(),
                                 [](const detail::ParamSpec& p) {
                                   return expert_matrix_slot(p.name) != 0;
                                 }),
                  m.specs.end());
  int64_t floats = 0;  // validate() bounded the sum
  for (const auto& spec : m.specs) floats += Tensor::numel_of(spec.shape);
  // Gradients are allocated on first use (backward, grad()): a layer used only for
  // inference holds its parameters alone.
  allocate_or_throw("parameters", floats, [&] {
    for (auto& spec : m.specs) {
      m.index[spec.name] = m.names.size();
      m.names.push_back(spec.name);
      m.params.emplace_back(spec.shape);
      m.grads.emplace_back();
    }
  });
  if (opt.initialise) detail::init_parameters(m.params, m.names, cfg);  // else the zeros
  m.sel_bias = Tensor({cfg.n_experts});
  if (!m.masters) {
    int64_t held = 0;  // the copies in the layer's precision, 2 bytes a value in bf16
    for (const auto& spec : all_specs)
      if (expert_matrix_slot(spec.name)) held += Tensor::numel_of(spec.shape);
    // Floats' worth: a byte a value in int8 (and 8 per column), two in bf16, about half a
    // byte in the 4-bit formats, one in fp8.
    const Precision p = cfg.precision;
    const int64_t floats = p == Precision::bf16 ? held / 2
                           : p == Precision::int8 || p == Precision::fp8 ? held / 4
                                                                         : held / 7;
    const std::string what = cat("expert weights (", to_string(p), ")");
    allocate_or_throw(what.c_str(), floats, [&] {
                        m.prec.hold_only(stack_shape(all_specs, cfg, false), opt.initialise);
                        if (cfg.n_shared_experts > 0)
                          m.shared.precision().hold_only(stack_shape(all_specs, cfg, true),
                                                         opt.initialise);
                      });
  }
}

// The spec of expert matrix `name` (W1, W2, W3, Ws1, Ws2, Ws3) of a layer with cfg; `who`
// names the caller in the error.
static const detail::ParamSpec& find_expert_matrix(const std::vector<detail::ParamSpec>& specs,
                                                   const std::string& name, const char* who) {
  const detail::ParamSpec* spec = nullptr;
  for (const auto& p : specs)
    if (p.name == name) spec = &p;
  MOE_REQUIRE(expert_matrix_slot(name) != 0 && spec != nullptr, who, ": '", name,
              "' is not an expert matrix of this layer (W1, W2, W3, Ws1, Ws2, Ws3 as the kind has)");
  return *spec;
}

// The same, checked with expert e and a source pointer: what both set_expert_matrix forms
// require.
static const detail::ParamSpec& expert_matrix_spec(const std::vector<detail::ParamSpec>& specs,
                                                   const std::string& name, int64_t e,
                                                   const void* src) {
  const detail::ParamSpec* spec = &find_expert_matrix(specs, name, "set_expert_matrix");
  MOE_REQUIRE(e >= 0 && e < spec->shape[0], "set_expert_matrix: expert ", e, " of ", name,
              " out of range 0..", spec->shape[0] - 1);
  MOE_REQUIRE(src != nullptr, "set_expert_matrix: src is null");
  return *spec;
}

void MoELayer::set_expert_matrix(const std::string& name, int64_t e, const float* src) {
  Impl& m = *impl_;
  const int slot = expert_matrix_slot(name);
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  const detail::ParamSpec* spec = &expert_matrix_spec(specs, name, e, src);
  const int64_t n = spec->shape[1] * spec->shape[2];
  if (m.masters) {
    std::copy(src, src + n, param(name).data.begin() + e * n);  // param() marks the copies stale
    return;
  }
  const bool shared = name[1] == 's';  // rounded or quantized from src, one expert matrix
  (shared ? m.shared.precision() : m.prec).assign(slot, e, src, stack_shape(specs, m.cfg, shared));
}

void MoELayer::set_expert_matrix_bf16(const std::string& name, int64_t e, const uint16_t* src,
                                      int64_t s_in, int64_t s_out) {
  Impl& m = *impl_;
  const int slot = expert_matrix_slot(name);
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  const detail::ParamSpec* spec = &expert_matrix_spec(specs, name, e, src);
  const int64_t In = spec->shape[1], Out = spec->shape[2];
  if (!m.masters && m.cfg.precision == Precision::bf16) {
    const bool shared = name[1] == 's';
    (shared ? m.shared.precision() : m.prec)
        .assign_bf16(slot, e, src, s_in, s_out, stack_shape(specs, m.cfg, shared));
    return;
  }
  std::vector<float> wide(static_cast<size_t>(In * Out));
  for (int64_t i = 0; i < In; ++i)
    for (int64_t o = 0; o < Out; ++o)
      wide[static_cast<size_t>(i * Out + o)] = detail::from_bf16(src[i * s_in + o * s_out]);
  set_expert_matrix(name, e, wide.data());
}

void detail::LayerAccess::set_expert_matrix_stored(MoELayer& L, const std::string& name,
                                                   int64_t e, const QuantMatrix& v) {
  MoELayer::Impl& m = *L.impl_;
  MOE_REQUIRE(low_bit(m.cfg.precision), "set_expert_matrix_stored: '", name,
              "' of a layer of precision '", to_string(m.cfg.precision),
              "': stored low-bit bytes go into a layer of their precision");
  const int slot = expert_matrix_slot(name);
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  expert_matrix_spec(specs, name, e, v.codes);
  const bool shared = name[1] == 's';
  detail::ExpertPrecision& p = shared ? m.shared.precision() : m.prec;
  const detail::ExpertShape s = stack_shape(specs, m.cfg, shared);
  // With masters the copies may not exist yet (made at the first forward): sized here.
  if (static_cast<int64_t>(p.quant.stack(slot).size()) != s.E) p.quant.shape(s);
  p.assign_stored(slot, e, v, s);
}

void detail::LayerAccess::stored_copies_current(MoELayer& L) {
  MoELayer::Impl& m = *L.impl_;
  MOE_ASSERT(low_bit(m.cfg.precision));
  m.prec.quant.ready = true;
  if (m.cfg.n_shared_experts > 0) m.shared.precision().quant.ready = true;
}

const detail::QuantMatrix& detail::LayerAccess::expert_matrix_stored(const MoELayer& L,
                                                                    const std::string& name,
                                                                    int64_t e) {
  const MoELayer::Impl& m = *L.impl_;
  MOE_REQUIRE(low_bit(m.cfg.precision) && !m.masters, "expert_matrix_stored: the layer holds ",
              "no low-bit bytes (precision '", to_string(m.cfg.precision), "'",
              m.masters ? ", with masters" : "", ")");
  const int slot = expert_matrix_slot(name);
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  const detail::ParamSpec& spec = find_expert_matrix(specs, name, "expert_matrix_stored");
  MOE_REQUIRE(e >= 0 && e < spec.shape[0], "expert_matrix_stored: expert ", e, " of ", name,
              " out of range 0..", spec.shape[0] - 1);
  const bool shared = name[1] == 's';
  return (shared ? m.shared.precision() : m.prec).quant.stack(slot)[static_cast<size_t>(e)].m;
}

bool MoELayer::holds_masters() const { return impl_->masters; }

Tensor MoELayer::expert_matrix(const std::string& name) const {
  const Impl& m = *impl_;
  const int slot = expert_matrix_slot(name);
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  const detail::ParamSpec* spec = &find_expert_matrix(specs, name, "expert_matrix");
  if (m.masters) return param(name);
  Tensor out(spec->shape);
  const bool shared = name[1] == 's';
  (shared ? m.shared.precision() : m.prec).read(slot, out.data.data(), stack_shape(specs, m.cfg, shared));
  return out;
}

void MoELayer::drop_masters() {
  Impl& m = *impl_;
  if (!m.masters || m.cfg.precision == Precision::fp32) return;
  const std::vector<detail::ParamSpec> specs = detail::parameter_specs(m.cfg);
  // The copies, made once more from the masters, become the weights (int8 quantized once).
  m.prec.fix_from(m.expert_weights(), m.shape);
  if (m.cfg.n_shared_experts > 0) {
    const detail::SharedWeights sw = m.shared_weights();
    m.shared.precision().fix_from({sw.W1, sw.b1, sw.W2, sw.b2, sw.W3, sw.b3},
                                  stack_shape(specs, m.cfg, true));
  }
  std::vector<detail::ParamSpec> keep_specs;
  std::vector<std::string> keep_names;
  std::vector<Tensor> keep_params, keep_grads;
  m.index.clear();
  for (size_t i = 0; i < m.specs.size(); ++i) {
    if (expert_matrix_slot(m.specs[i].name)) continue;
    m.index[m.specs[i].name] = keep_names.size();
    keep_specs.push_back(m.specs[i]);
    keep_names.push_back(m.names[i]);
    keep_params.push_back(std::move(m.params[i]));
    keep_grads.push_back(std::move(m.grads[i]));
  }
  m.specs = std::move(keep_specs);
  m.names = std::move(keep_names);
  m.params = std::move(keep_params);
  m.grads = std::move(keep_grads);
  m.masters = false;
}

MoELayer::~MoELayer() = default;
MoELayer::MoELayer(MoELayer&&) noexcept = default;
MoELayer& MoELayer::operator=(MoELayer&&) noexcept = default;

const MoEConfig& MoELayer::config() const { return impl_->cfg; }
std::vector<std::string> MoELayer::parameter_names() const { return impl_->names; }
Tensor& MoELayer::param(const std::string& name) {
  Tensor& t = impl_->params[impl_->find(name)];
  weights_changed();  // the caller may write through it
  return t;
}
const Tensor& MoELayer::param(const std::string& name) const {
  return impl_->params[impl_->find(name)];
}
Tensor& MoELayer::grad(const std::string& name) {
  const size_t i = impl_->find(name);
  impl_->ensure_grads();
  return impl_->grads[i];
}
bool MoELayer::has_gradients() const { return impl_->grads_ready; }
void MoELayer::zero_grad() {
  for (auto& g : impl_->grads) std::fill(g.data.begin(), g.data.end(), 0.0f);
}
void MoELayer::reset_global_load() { impl_->balance.reset_global(); }
void MoELayer::set_rounding(bool router_logits, bool gate_weights, bool each_op,
                            TieBreak tie_break) {
  Impl& m = *impl_;
  MoEConfig c = m.cfg;
  c.round_router_logits = router_logits;
  c.round_gate_weights = gate_weights;
  c.round_each_op = each_op;
  c.tie_break = tie_break;
  c.validate();
  m.cfg = c;
  m.rcfg = c.router();
  m.shape = detail::ExpertShape::of(c);
}

void MoELayer::weights_changed() {
  impl_->prec.invalidate();
  impl_->shared.weights_changed();
}
const MoEStats& MoELayer::stats() const { return impl_->stats; }
double MoELayer::aux_loss() const { return impl_->stats.aux_loss; }
double MoELayer::z_loss() const { return impl_->stats.z_loss; }
const RouterState& MoELayer::routing() const { return impl_->routing; }
const Tensor& MoELayer::expert_bias() const { return impl_->sel_bias; }
Tensor& MoELayer::expert_bias() { return impl_->sel_bias; }

void MoELayer::update_expert_bias() {
  Impl& m = *impl_;
  const float rate = m.cfg.bias_update_rate;
  if (rate <= 0.0f || m.bias_load.empty()) return;
  const int64_t E = m.cfg.n_experts;
  MOE_REQUIRE(m.sel_bias.shape == std::vector<int64_t>{E},
              "expert_bias: expected shape [", E, "], got ", shape_str(m.sel_bias.shape));
  double total = 0.0;
  for (int64_t e = 0; e < E; ++e) total += static_cast<double>(m.bias_load[e]);
  const double mean = total / static_cast<double>(E);
  for (int64_t e = 0; e < E; ++e) {
    const double l = static_cast<double>(m.bias_load[e]);
    m.sel_bias.data[e] += mean > l ? rate : mean < l ? -rate : 0.0f;
  }
  m.bias_load.clear();
}

void MoELayer::forward(float* y, const float* x, int64_t T, const ForwardOptions& opt) {
  Impl& m = *impl_;
  const MoEConfig& cfg = m.cfg;
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(T * cfg.k <= int64_t{0x7fffffff}, "T: too many tokens for one batch, got ", T);
  MOE_REQUIRE(T == 0 || (x && y), "forward: x and y must not be null");
  MOE_REQUIRE(!(opt.training && evaluation_only(cfg.precision)), "precision: '",
              to_string(cfg.precision),
              "' is for evaluation only; a training forward needs fp32 or bf16");
  MOE_REQUIRE(!opt.training || m.masters,
              "forward: training needs the fp32 masters of the experts (W1, ...); this layer "
              "holds them in ", to_string(cfg.precision),
              " only (built for evaluation, e.g. by from_pretrained): evaluate it (training off), "
              "or build it with fp32 masters");
  m.check_params();
  if (cfg.uses_selection_bias()) {
    MOE_REQUIRE(m.sel_bias.numel() == cfg.n_experts, "expert_bias: expected ", cfg.n_experts,
                " values, got ", m.sel_bias.numel());
    for (int64_t e = 0; e < cfg.n_experts; ++e)
      MOE_REQUIRE(std::isfinite(m.sel_bias.data[e]), "expert_bias: non-finite value at expert ",
                  e);
  }
  m.have_forward = false;
  m.routed_k = 0;
  detail::balance_check_batch(cfg, T);
  // The workspace and the router's (T, E) buffers, before x is read.
  allocate_or_throw("forward: workspace for the batch",
                    detail::layer_workspace_floats(cfg, T) + T * (2 * cfg.k + 5 * cfg.n_experts),
                    [&] { m.ws.reserve(cfg, T); });

  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k, Do = cfg.out_dim();
  NoiseSource ns;
  ns.eps = opt.noise;
  ns.seed = cfg.seed;
  ns.step = opt.step;
  ns.token_offset = opt.token_offset;
  router_forward(m.routing, x, m.router_params(), m.rcfg, T, opt.training, ns);
  if (cfg.router_kind == RouterKind::expert_choice) {
    detail::expert_choice_forward(y, m.ec_plan, m.routing, m.stats, x, T,
                                  m.expert_choice_layer(T));
    m.T = T;
    m.have_forward = true;
    return;
  }

  const int64_t C = cfg.capacity(T);
  detail::PlanOptions po;
  po.C = C;
  po.policy = cfg.drop_policy;
  po.second = cfg.second_expert_policy;
  po.seed = cfg.seed;
  po.step = opt.step;
  po.token_offset = opt.token_offset;
  detail::build_capacity_plan(m.plan, m.routing.indices.data(), m.routing.weights.data(), T, k, E,
                              po);
  m.ws.reserve(cfg, T);
  detail::LayerBuffers b = m.ws.carve(cfg, T);
  m.T = T;

  // Save x for the router's backward, gather the kept rows grouped by expert.
  const detail::CapacityPlan& plan = m.plan;
  const int64_t R = plan.n_kept;
  std::copy(x, x + T * d, b.x);
  detail::gather_rows(b.xg, x, plan.dest_to_src.data(), R, k, d);

  detail::ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  detail::experts_forward(acts, b.xg, m.expert_weights(), plan.offsets.data(), m.shape, m.gg,
                          &m.prec);

  // Combine: a k-way weighted sum per token in rank order; no atomics.
  detail::combine_rows(y, b.out, plan.src_to_dest.data(), m.routing.weights.data(), T, k, Do,
                       cfg.residual ? x : nullptr, cfg.round_gate_weights);

  if (cfg.n_shared_experts > 0) m.shared.forward(y, x, T, m.shared_weights(), cfg);

  MoEStats& st = m.stats;
  st.tokens = T;
  st.capacity = C;
  st.load_before = plan.load_before;
  st.load_after = plan.load_after;
  st.dropped_assignments = T * k - R;
  st.dropped_tokens = plan.dropped_tokens;
  st.experts_evaluated = 0;
  for (int64_t e = 0; e < E; ++e) st.experts_evaluated += plan.load_after[e] > 0 ? 1 : 0;
  st.aux_loss = detail::balance_forward(m.balance, m.routing, cfg, plan.load_before, opt.training);
  st.z_loss = cfg.z_alpha > 0.0f ? detail::router_z_loss_t<float>(nullptr, m.routing.logits.data(),
                                                                  T, E, cfg.z_alpha)
                                 : 0.0;
  if (opt.training && cfg.bias_update_rate > 0.0f) m.bias_load = plan.load_before;
  m.have_forward = true;
}

void MoELayer::backward(float* dx, const float* dy) {
  Impl& m = *impl_;
  MOE_REQUIRE(!evaluation_only(m.cfg.precision), "precision: '", to_string(m.cfg.precision),
              "' is for evaluation only; backward needs fp32 or bf16");
  MOE_REQUIRE(m.have_forward, "backward: called before forward (no saved state)");
  MOE_REQUIRE(m.masters, "backward: needs the fp32 masters of the experts (W1, ...); this layer "
              "holds them in ", to_string(m.cfg.precision), " only (evaluation only)");
  m.ensure_grads();
  // An optimizer step follows a backward: the bf16 copies are made again before the next
  // forward (and this backward's transposed copies from the masters as they are now).
  weights_changed();
  const MoEConfig& cfg = m.cfg;
  const int64_t T = m.T, d = cfg.d_model, E = cfg.n_experts, k = cfg.k, Do = cfg.out_dim();
  MOE_REQUIRE(T == 0 || (dx && dy), "backward: dx and dy must not be null");
  if (T == 0) return;
  if (cfg.router_kind == RouterKind::expert_choice) {
    RouterGrads rg{m.g("W_g"), m.g("b_g"), m.g("W_noise")};
    detail::ExpertGrads eg{m.g("W1"), m.g("b1"), m.g("W2"), m.g("b2"), m.g("W3"), m.g("b3")};
    detail::expert_choice_backward(dx, rg, eg, dy, m.ec_plan, m.routing, m.expert_choice_layer(T));
    return;
  }
  detail::LayerBuffers b = m.ws.carve(cfg, T);
  const detail::CapacityPlan& plan = m.plan;
  const int64_t R = plan.n_kept;
  const int32_t* s2d = plan.src_to_dest.data();
  const int32_t* d2s = plan.dest_to_src.data();
  const float* w = m.routing.weights.data();
  const float* out = b.out;

  // Combine backward: dG[t,j] = dy_t · out(t,j) and dout(t,j) = G[t,j]·dy_t for kept j;
  // a dropped assignment contributed nothing, so it gets nothing back.
  float* dG = b.dweights;
  detail::combine_backward_weights(dG, dy, out, s2d, T, k, Do);
  detail::combine_backward_rows(b.dout, dy, d2s, w, R, k, Do);

  detail::ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  detail::ExpertScratch scr{b.dh, b.da3};
  detail::ExpertGrads eg{m.g("W1"), m.g("b1"), m.g("W2"), m.g("b2"), m.g("W3"), m.g("b3")};
  detail::experts_backward(b.dxg, eg, b.dout, scr, acts, b.xg, m.expert_weights(),
                           plan.offsets.data(), m.shape, m.gg, &m.prec);

  // Router: gate weights, balancing loss (through P, or for shazeer through the gates, h and
  // the noise scale), z-loss through h. dx is assigned here.
  const float* dprobs = nullptr;
  const float* dlogits = nullptr;
  if (cfg.z_alpha > 0.0f) {
    detail::router_z_loss_t<float>(b.dlogits, m.routing.logits.data(), T, E, cfg.z_alpha);
    dlogits = b.dlogits;
  }
  float* dpre = nullptr;
  if (cfg.aux_alpha > 0.0f && cfg.aux_loss_kind != AuxLossKind::none) {
    detail::BalanceGrads<float> bg;
    if (cfg.aux_loss_kind == AuxLossKind::shazeer) {
      if (!dlogits) std::fill(b.dlogits, b.dlogits + T * E, 0.0f);
      dlogits = b.dlogits;
      bg.dh = b.dlogits;
      bg.dweights = dG;
      if (m.balance.noisy && cfg.noise == Noise::learned) {
        m.balance.dpre.assign(static_cast<size_t>(T * E), 0.0f);
        dpre = bg.dpre = m.balance.dpre.data();
      }
    } else {
      dprobs = bg.dprobs = b.dprobs;
    }
    detail::balancing_loss<float>(bg, detail::balance_inputs(m.routing, m.balance),
                                  detail::BalanceSpec::of(cfg));
  }
  RouterGrads rg{m.g("W_g"), m.g("b_g"), m.g("W_noise")};
  router_backward(dx, rg, dG, dprobs, dlogits, m.routing, b.x, m.router_params(), m.rcfg);
  if (dpre) {  // shazeer's load term through the noise scale: x_r·W_noise
    // x_r is the router's input: x, or x⊙J when jitter was applied (J saved by the router),
    // so dW_noise = x_rᵀ·dpre and dx += (dpre·W_noiseᵀ)⊙J.
    const std::vector<float>& J = m.routing.jitter;
    if (J.empty()) {
      detail::gemm_f32(true, false, d, E, T, 1.0f, b.x, d, dpre, E, 1.0f, m.g("W_noise"), E);
      detail::gemm_f32(false, true, T, d, E, 1.0f, dpre, E, m.p("W_noise"), E, 1.0f, dx, d);
    } else {
      std::vector<float>& xj = m.balance.xj;
      std::vector<float>& dxj = m.balance.dxj;
      xj.resize(static_cast<size_t>(T * d));
      dxj.resize(static_cast<size_t>(T * d));
      for (int64_t i = 0; i < T * d; ++i) xj[i] = b.x[i] * J[i];
      detail::gemm_f32(true, false, d, E, T, 1.0f, xj.data(), d, dpre, E, 1.0f, m.g("W_noise"),
                       E);
      detail::gemm_f32(false, true, T, d, E, 1.0f, dpre, E, m.p("W_noise"), E, 0.0f, dxj.data(),
                       d);
      for (int64_t i = 0; i < T * d; ++i) dx[i] += dxj[i] * J[i];
    }
  }

  // Scatter the experts' dx back per token, in rank order, plus the residual path.
  detail::gather_backward_rows(dx, b.dxg, s2d, T, k, d, false, cfg.residual ? dy : nullptr);
  if (cfg.n_shared_experts > 0) {
    detail::SharedGrads sg{m.g("Ws1"), m.g("bs1"), m.g("Ws2"), m.g("bs2"), m.g("Ws3"),
                           m.g("w_shared_gate"), m.g("bs3")};
    m.shared.backward(dx, sg, dy, m.shared_weights(), cfg);
  }
}

void MoELayer::forward_routed(float* y, const float* x, int64_t T, const int32_t* indices,
                              const float* weights, int64_t k) {
  Impl& m = *impl_;
  const MoEConfig& cfg = m.cfg;
  const int64_t d = cfg.d_model, E = cfg.n_experts, Do = cfg.out_dim();
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(k >= 1, "k: must be at least 1, got ", k);
  MOE_REQUIRE(T <= int64_t{0x7fffffff} / k, "T: too many tokens for one batch, got ", T);
  MOE_REQUIRE(T == 0 || (x && y && indices && weights),
              "forward_routed: x, y, indices and weights must not be null");
  m.check_params();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = indices[t * k + j];
      MOE_REQUIRE(e >= 0 && e < E, "indices: expert ", e, " at token ", t, " (slot ", j,
                  ") is outside 0..", E - 1);
      MOE_REQUIRE(std::isfinite(weights[t * k + j]), "weights: non-finite value ",
                  weights[t * k + j], " at token ", t, " (slot ", j, ")");
    }
    for (int64_t i = 0; i < d; ++i)
      MOE_REQUIRE(std::isfinite(x[t * d + i]), "x: non-finite value at token ", t);
  }
  m.have_forward = false;  // the workspace below is the forward's: no layer backward after it
  m.routed_k = 0;
  // The layer's workspace sized for k assignments per token, without a router's rows.
  MoEConfig wc = cfg;
  wc.k = k;
  wc.router_kind = RouterKind::topk_softmax;
  allocate_or_throw("forward_routed: workspace for the batch",
                    detail::layer_workspace_floats(wc, T), [&] { m.ws.reserve(wc, T); });
  detail::build_capacity_plan(m.plan, indices, weights, T, k, E, int64_t{-1},
                              DropPolicy::position);
  detail::LayerBuffers b = m.ws.carve(wc, T);
  const detail::CapacityPlan& plan = m.plan;
  detail::gather_rows(b.xg, x, plan.dest_to_src.data(), plan.n_kept, k, d);
  detail::ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  detail::experts_forward(acts, b.xg, m.expert_weights(), plan.offsets.data(), m.shape, m.gg,
                          &m.prec);
  // The combine of forward, in the same order: y_t = Σ_j w_tj·out(t, j).
  detail::combine_rows(y, b.out, plan.src_to_dest.data(), weights, T, k, Do, nullptr);
  m.T = T;
  m.routed_weights.assign(weights, weights + T * k);
  m.routed_k = k;
}

void MoELayer::backward_routed(float* dx, float* dweights, const float* dy) {
  Impl& m = *impl_;
  MOE_REQUIRE(m.routed_k > 0, "backward_routed: called before forward_routed (no saved state)");
  const MoEConfig& cfg = m.cfg;
  const int64_t T = m.T, k = m.routed_k, d = cfg.d_model, Do = cfg.out_dim();
  MOE_REQUIRE(T == 0 || (dx && dweights && dy),
              "backward_routed: dx, dweights and dy must not be null");
  if (T == 0) return;
  m.ensure_grads();
  weights_changed();  // as backward: an optimizer step may follow
  MoEConfig wc = cfg;
  wc.k = k;
  wc.router_kind = RouterKind::topk_softmax;
  detail::LayerBuffers b = m.ws.carve(wc, T);
  const detail::CapacityPlan& plan = m.plan;
  const int64_t R = plan.n_kept;
  const int32_t* s2d = plan.src_to_dest.data();
  const int32_t* d2s = plan.dest_to_src.data();
  const float* w = m.routed_weights.data();
  const float* out = b.out;
  // The combine's backward, as in backward(): dweights[t,j] = dy_t·out(t,j), dout = w·dy_t.
  detail::combine_backward_weights(dweights, dy, out, s2d, T, k, Do);
  detail::combine_backward_rows(b.dout, dy, d2s, w, R, k, Do);
  detail::ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  detail::ExpertScratch scr{b.dh, b.da3};
  detail::ExpertGrads eg{m.g("W1"), m.g("b1"), m.g("W2"), m.g("b2"), m.g("W3"), m.g("b3")};
  detail::experts_backward(b.dxg, eg, b.dout, scr, acts, b.xg, m.expert_weights(),
                           plan.offsets.data(), m.shape, m.gg, &m.prec);
  detail::gather_backward_rows(dx, b.dxg, s2d, T, k, d, true, nullptr);
  m.routed_k = 0;  // the activations were used as scratch
}

}  // namespace moe
