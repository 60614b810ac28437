// The `moe` Python package's native part (SPEC §5): NumPy arrays in and out, any float
// dtype or layout accepted by converting to C-contiguous float32 once at the boundary.
// moe::Error becomes moe.Error, a subclass of ValueError carrying the same message.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include <mutex>

#include "common/check.hpp"
#include "moe/checkpoint.hpp"
#include "moe/moe.hpp"
#include "common/cpu.hpp"
#include "common/gemm.hpp"
#include "experts/int8.hpp"
#include "experts/lowbit.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "moe/optim.hpp"
#include "moe/pretrained.hpp"
#include "layer/layer_ref.hpp"  // moe.torch's float64 path (bind_torch_support)

namespace py = pybind11;
using moe::detail::cat;

namespace {

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) {
  std::vector<int64_t> s(a.shape(), a.shape() + a.ndim());
  return moe::shape_str(s);
}

// Any array-like of numbers → C-contiguous float32 (a copy only when needed).
FArray as_f32(const py::handle& obj, const char* name) {
  if (obj.is_none()) throw moe::Error(cat(name, ": expected an array, got None"));
  py::array a;
  try {
    a = py::array::ensure(obj);
  } catch (const py::error_already_set&) {
  }
  if (!a) throw moe::Error(cat(name, ": expected a numeric array"));
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b')
    throw moe::Error(cat(name, ": expected a numeric array, got dtype ",
                         std::string(py::str(a.dtype()))));
  // ensure() returns a null handle (and clears the Python error) when the float32 copy
  // cannot be made, e.g. a huge broadcast view: say so instead of using the null array.
  FArray f = FArray::ensure(a);
  if (!f)
    throw moe::Error(cat(name, ": cannot convert ", a.size(),
                         " values to a float32 array (out of memory)"));
  return f;
}

FArray as_f32_2d(const py::handle& obj, const char* name, const char* dims) {
  FArray a = as_f32(obj, name);
  if (a.ndim() != 2)
    throw moe::Error(cat(name, ": expected a 2-D array ", dims, ", got shape ", shape_of(a)));
  return a;
}

// Integer array (T, k) → C-contiguous int32, checked against 0..n-1 before narrowing.
IArray as_index_2d(const py::handle& obj, const char* name, const char* dims,
                                    int64_t n) {
  if (obj.is_none()) throw moe::Error(cat(name, ": expected an array, got None"));
  py::array a = py::array::ensure(obj);
  if (!a) throw moe::Error(cat(name, ": expected an integer array"));
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw moe::Error(cat(name, ": expected an integer array, got dtype ",
                         std::string(py::str(a.dtype()))));
  if (a.ndim() != 2)
    throw moe::Error(cat(name, ": expected a 2-D array ", dims, ", got shape ", shape_of(a)));
  using LArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  LArray wide = LArray::ensure(a);
  if (!wide) throw moe::Error(cat(name, ": values do not fit in int64"));
  const int64_t cols = wide.shape(1);
  const int64_t* v = wide.data();
  for (int64_t i = 0; i < wide.size(); ++i)
    MOE_REQUIRE(v[i] >= 0 && v[i] < n, name, ": expert index out of range 0..", n - 1,
                " at token ", i / cols, ", got ", v[i]);
  return IArray::ensure(wide);
}

void require_shape(const py::array& a, const char* name, std::vector<int64_t> want,
                   const char* dims) {
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != want)
    throw moe::Error(cat(name, ": expected shape ", moe::shape_str(want), " ", dims, ", got ",
                         moe::shape_str(got)));
}

uint64_t as_seed(const py::int_& seed) {
  if (seed < py::int_(0)) throw moe::Error(cat("seed: must be >= 0, got ", std::string(py::str(py::object(seed)))));
  return seed.cast<uint64_t>();
}

py::array_t<float> to_numpy(const float* p, std::vector<py::ssize_t> shape) {
  py::array_t<float> a(shape);
  std::copy(p, p + a.size(), a.mutable_data());
  return a;
}

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
  return to_numpy(v.data(), std::move(shape));
}

// ---- router ----------------------------------------------------------------------------

py::array_t<float> py_noisy_top_k_gating(const py::object& logits, int64_t k,
                                         double noise_stddev, bool training,
                                         const py::int_& seed) {
  FArray h = as_f32(logits, "logits");
  if (h.ndim() != 1 && h.ndim() != 2)
    throw moe::Error(cat("logits: expected a 1-D (E) or 2-D (T, E) array, got shape ",
                         shape_of(h)));
  const int64_t T = h.ndim() == 2 ? h.shape(0) : 1;
  const int64_t E = h.shape(h.ndim() - 1);
  const uint64_t s = as_seed(seed);
  std::vector<float> g;
  {
    py::gil_scoped_release nogil;
    g = moe::noisy_top_k_gating(h.data(), T, E, k, static_cast<float>(noise_stddev), training, s);
  }
  if (h.ndim() == 1) return to_numpy(g, {E});
  return to_numpy(g, {T, E});
}

struct RouteResult {
  py::array_t<float> gates, weights, probs, noisy_logits, logits;
  py::array_t<int32_t> indices;
  py::object eps;  // ε actually used (T, E), or None when no noise was applied
  py::object jitter;  // router-input factors (T, d_model), or None without jitter
  py::object ec_tokens, ec_gates;  // router "expert_choice": (E, C) each, else None
};

RouteResult routing_of(const moe::RouterState& s) {
  RouteResult r;
  const int64_t T = s.T, E = s.E, k = s.k;
  r.gates = to_numpy(s.dense_gates(), {T, E});
  r.weights = to_numpy(s.weights, {T, k});
  r.probs = to_numpy(s.probs, {T, E});
  r.noisy_logits = to_numpy(s.noisy.empty() ? s.logits : s.noisy, {T, E});  // H = h: no noise
  r.logits = to_numpy(s.logits, {T, E});
  r.indices = py::array_t<int32_t>(std::vector<py::ssize_t>{T, k});
  std::copy(s.indices.begin(), s.indices.end(), r.indices.mutable_data());
  r.eps = s.eps.empty() ? py::object(py::none()) : py::object(to_numpy(s.eps, {T, E}));
  r.jitter = s.jitter.empty() || T == 0
                 ? py::object(py::none())
                 : py::object(to_numpy(s.jitter, {T, static_cast<int64_t>(s.jitter.size()) / T}));
  r.ec_tokens = r.ec_gates = py::none();
  if (!s.ec_tokens.empty()) {
    const int64_t C = s.ec_capacity;
    py::array_t<int32_t> et(std::vector<py::ssize_t>{E, C});
    std::copy(s.ec_tokens.begin(), s.ec_tokens.end(), et.mutable_data());
    r.ec_tokens = et;
    r.ec_gates = to_numpy(s.ec_gates, {E, C});
  }
  return r;
}

RouteResult py_route(const py::object& X_, const py::object& W_g_, int64_t k,
                     const py::object& W_noise_, const py::object& noise_,
                     const std::string& noise_scale, const std::string& tie_break, bool training,
                     const py::int_& seed) {
  FArray X = as_f32_2d(X_, "X", "(T, d_model)");
  FArray W_g = as_f32_2d(W_g_, "W_g", "(d_model, n_experts)");
  const int64_t T = X.shape(0), d = X.shape(1), E = W_g.shape(1);
  require_shape(W_g, "W_g", {d, E}, "(d_model, n_experts)");
  moe::RouterConfig cfg;
  cfg.d_model = d;
  cfg.n_experts = E;
  cfg.k = k;
  cfg.noise_scale = moe::parse_noise_scale(noise_scale);
  cfg.tie_break = moe::parse_tie_break(tie_break);
  cfg.validate();
  moe::RouterParams p;
  p.W_g = W_g.data();
  FArray W_noise, eps;
  if (!W_noise_.is_none()) {
    W_noise = as_f32_2d(W_noise_, "W_noise", "(d_model, n_experts)");
    require_shape(W_noise, "W_noise", {d, E}, "(d_model, n_experts)");
    cfg.noise = moe::Noise::learned;
    p.W_noise = W_noise.data();
  }
  moe::NoiseSource ns;
  ns.seed = as_seed(seed);
  if (!noise_.is_none()) {
    if (W_noise_.is_none())
      throw moe::Error("noise: given without W_noise (the noise scale comes from W_noise)");
    eps = as_f32_2d(noise_, "noise", "(T, n_experts)");
    require_shape(eps, "noise", {T, E}, "(T, n_experts)");
    ns.eps = eps.data();
  }
  moe::RouterState s;
  {
    py::gil_scoped_release nogil;
    moe::router_forward(s, X.data(), p, cfg, T, training, ns);
  }
  return routing_of(s);
}

double py_load_balancing_loss(const py::object& indices_, const py::object& probs_,
                              int64_t n_experts, double alpha, bool normalize_by_k) {
  MOE_REQUIRE(n_experts >= 1, "n_experts: must be at least 1, got ", n_experts);
  IArray idx = as_index_2d(indices_, "indices", "(T, k)", n_experts);
  FArray probs = as_f32_2d(probs_, "probs", "(T, n_experts)");
  const int64_t T = idx.shape(0), k = idx.shape(1);
  require_shape(probs, "probs", {T, n_experts}, "(T, n_experts)");
  MOE_REQUIRE(k >= 1 && k <= n_experts, "indices: k (columns) must be in 1..", n_experts,
              " (n_experts), got ", k);
  return moe::load_balancing_loss(nullptr, idx.data(), probs.data(), T, k, n_experts, alpha,
                                  normalize_by_k);
}


// ---- the layer ---------------------------------------------------------------------------

// Every parameter name any expert kind can have; a layer has the subset its config gives.
const char* const kParamNames[] = {"W_g", "b_g", "W_noise", "W1",  "b1",  "W2",
                                   "b2",  "W3",  "b3",      "Ws1", "bs1", "Ws2",
                                   "bs2", "Ws3", "bs3",     "w_shared_gate"};

py::array_t<float> tensor_to_numpy(const moe::Tensor& t) {
  return to_numpy(t.ptr(), std::vector<py::ssize_t>(t.shape.begin(), t.shape.end()));
}

// Gradient buffers that moe.torch handed to autograd (_take_grad) come back here when torch
// drops them (optimizer.zero_grad() sets .grad to None), so that the next hand-off reuses
// their pages instead of faulting in fresh ones (268 MB a step at B1).
struct GradPool {
  std::mutex m;
  std::vector<std::vector<float>> free;
};

// moe.MoE: a MoELayer plus what the Python side needs between calls.
// The configuration as a dict of moe.MoE's keywords: moe.MoE(**m.config) rebuilds the
// layer. Its fields are config_to_json's (the one list of MoEConfig fields, whose names
// are the keywords: the experts' bias switch is "bias" there too), with the widths
// resolved (d_ff None for linear_relu).
py::dict config_dict(const moe::MoEConfig& c) {
  py::dict d = py::module_::import("json").attr("loads")(moe::config_to_json(c));
  d["d_ff"] = c.expert == moe::ExpertKind::linear_relu ? py::object(py::none())
                                                       : py::object(py::int_(c.hidden()));
  d["d_out"] = c.out_dim();
  d["shared_d_ff"] =
      c.shared_d_ff > 0 ? py::object(py::int_(c.shared_d_ff)) : py::object(py::none());
  // JSON writes a whole float as an integer (1 for 1.0): the float fields stay floats.
  for (const auto& item : d)
    if (py::isinstance<py::int_>(item.second) && !py::isinstance<py::bool_>(item.second)) {
      const std::string key = py::str(item.first);
      static const char* const kFloats[] = {"capacity_factor", "noise_stddev", "aux_alpha",
                                            "z_alpha", "router_init_std", "scaling_factor",
                                            "bias_update_rate", "jitter", "swiglu_alpha",
                                            "swiglu_limit"};
      for (const char* f : kFloats)
        if (key == f) d[item.first] = py::float_(item.second.cast<double>());
    }
  return d;
}

struct PyMoE {
  moe::MoELayer layer;
  std::shared_ptr<GradPool> grad_pool = std::make_shared<GradPool>();
  int64_t T = -1;          // tokens of the last forward, -1 before any
  bool one_token = false;  // the last forward got a 1-D x: backward takes and gives 1-D
  uint64_t step = 0;       // noise counter used when forward is given no step
  int64_t routed_T = -1, routed_k = 0;  // the last experts_forward, for experts_backward

  explicit PyMoE(const moe::MoEConfig& c) : layer(c) {}
  explicit PyMoE(moe::MoELayer&& l) : layer(std::move(l)) {}

  bool has(const std::string& name) const {
    for (const auto& n : layer.parameter_names())
      if (n == name) return true;
    return false;
  }
  std::string kind() const { return moe::to_string(layer.config().expert); }

  py::array_t<float> get(const std::string& name) const {
    if (!has(name))
      throw py::attribute_error(cat("MoE(expert='", kind(), "', noise='",
                                    moe::to_string(layer.config().noise),
                                    "') has no parameter ", name));
    return tensor_to_numpy(layer.param(name));
  }
  void set(const std::string& name, const py::object& value) {
    if (!has(name))
      throw py::attribute_error(cat("MoE(expert='", kind(), "', noise='",
                                    moe::to_string(layer.config().noise),
                                    "') has no parameter ", name));
    moe::Tensor& p = layer.param(name);
    FArray a = as_f32(value, name.c_str());
    std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
    if (got != p.shape)
      throw moe::Error(cat(name, ": expected shape ", moe::shape_str(p.shape), ", got ",
                           moe::shape_str(got)));
    std::copy(a.data(), a.data() + a.size(), p.ptr());  // into the layer's own buffer
  }
  py::dict as_dict(bool grads) {
    py::dict d;
    for (const auto& n : layer.parameter_names())
      d[py::str(n)] = tensor_to_numpy(grads ? layer.grad(n) : layer.param(n));
    return d;
  }

  // A layer that can train (fp32 masters, not int8) trains by default; an evaluation-only one
  // (from_pretrained without masters, drop_masters(), precision int8) evaluates by default.
  bool trains_by_default() const {
    return layer.holds_masters() && !moe::evaluation_only(layer.config().precision);
  }

  py::array_t<float> forward(const py::object& x_, const py::object& noise_,
                             const py::object& training_, const py::object& step_,
                             int64_t token_offset) {
    const moe::MoEConfig& c = layer.config();
    const bool training = training_.is_none() ? trains_by_default() : training_.cast<bool>();
    FArray x = as_f32(x_, "x");
    if (x.ndim() != 1 && x.ndim() != 2)
      throw moe::Error(cat("x: expected a 2-D array (T, d_model=", c.d_model,
                           ") or a 1-D token, got shape ", shape_of(x)));
    const bool one = x.ndim() == 1;
    const int64_t T = one ? 1 : x.shape(0);
    if (x.shape(x.ndim() - 1) != c.d_model)
      throw moe::Error(cat("x: expected shape (T, ", c.d_model, ") with d_model = ", c.d_model,
                           ", got ", shape_of(x)));
    MOE_REQUIRE(token_offset >= 0, "token_offset: must be >= 0, got ", token_offset);
    moe::ForwardOptions opt;
    opt.training = training;
    opt.token_offset = token_offset;
    opt.step = step_.is_none() ? step : as_seed(step_.cast<py::int_>());
    FArray eps;
    if (!noise_.is_none()) {
      MOE_REQUIRE(c.noise != moe::Noise::none,
                  "noise: given, but the layer was made with noise='none'");
      eps = as_f32(noise_, "noise");
      std::vector<int64_t> want = one ? std::vector<int64_t>{c.n_experts}
                                      : std::vector<int64_t>{T, c.n_experts};
      require_shape(eps, "noise", want, one ? "(n_experts)" : "(T, n_experts)");
      opt.noise = eps.data();
    }
    py::array_t<float> y(one ? std::vector<py::ssize_t>{c.out_dim()}
                             : std::vector<py::ssize_t>{T, c.out_dim()});
    this->T = -1;
    {
      py::gil_scoped_release nogil;
      layer.forward(y.mutable_data(), x.data(), T, opt);
    }
    this->T = T;
    one_token = one;
    // Fresh generated noise on every training step unless the caller pins the step.
    if (training && step_.is_none()) ++step;
    return y;
  }

  // The routed experts with the caller's routing (MoELayer::forward_routed).
  py::array_t<float> experts_forward(const py::object& x_, const py::object& indices_,
                                     const py::object& weights_) {
    const moe::MoEConfig& c = layer.config();
    FArray x = as_f32_2d(x_, "x", "(T, d_model)");
    const int64_t T = x.shape(0);
    require_shape(x, "x", {T, c.d_model}, "(T, d_model)");
    IArray idx = as_index_2d(indices_, "indices", "(T, k)", c.n_experts);
    const int64_t k = idx.shape(1);
    require_shape(idx, "indices", {T, k}, "(T, k) with T the rows of x");
    FArray w = as_f32_2d(weights_, "weights", "(T, k)");
    require_shape(w, "weights", {T, k}, "(T, k) like indices");
    py::array_t<float> y(std::vector<py::ssize_t>{T, c.out_dim()});
    this->T = -1;  // the layer's saved forward is gone
    routed_T = -1;
    {
      py::gil_scoped_release nogil;
      layer.forward_routed(y.mutable_data(), x.data(), T, idx.data(), w.data(), k);
    }
    routed_T = T;
    routed_k = k;
    return y;
  }

  py::tuple experts_backward(const py::object& dy_) {
    if (routed_T < 0)
      throw moe::Error("backward_routed: called before forward_routed (no saved state)");
    const moe::MoEConfig& c = layer.config();
    FArray dy = as_f32(dy_, "dy");
    require_shape(dy, "dy", {routed_T, c.out_dim()}, "(T, d_out) of the last experts_forward");
    py::array_t<float> dx(std::vector<py::ssize_t>{routed_T, c.d_model});
    py::array_t<float> dw(std::vector<py::ssize_t>{routed_T, routed_k});
    {
      py::gil_scoped_release nogil;
      layer.backward_routed(dx.mutable_data(), dw.mutable_data(), dy.data());
    }
    routed_T = -1;
    return py::make_tuple(dx, dw);
  }

  py::array_t<float> backward(const py::object& dy_) {
    if (T < 0) throw moe::Error("backward: called before forward (no saved state)");
    const moe::MoEConfig& c = layer.config();
    FArray dy = as_f32(dy_, "dy");
    std::vector<int64_t> want = one_token ? std::vector<int64_t>{c.out_dim()}
                                          : std::vector<int64_t>{T, c.out_dim()};
    require_shape(dy, "dy", want, one_token ? "(d_out)" : "(T, d_out) of the last forward");
    py::array_t<float> dx(one_token ? std::vector<py::ssize_t>{c.d_model}
                                    : std::vector<py::ssize_t>{T, c.d_model});
    {
      py::gil_scoped_release nogil;
      layer.backward(dx.mutable_data(), dy.data());
    }
    return dx;
  }

  py::dict stats() const {
    const moe::MoEStats& s = layer.stats();
    py::dict d;
    d["tokens"] = s.tokens;
    d["capacity"] = s.capacity < 0 ? py::object(py::none()) : py::object(py::int_(s.capacity));
    d["load_before"] = s.load_before;
    d["load_after"] = s.load_after;
    d["dropped_assignments"] = s.dropped_assignments;
    d["dropped_tokens"] = s.dropped_tokens;
    d["experts_evaluated"] = s.experts_evaluated;
    if (!s.experts_per_token.empty()) d["experts_per_token"] = s.experts_per_token;
    d["aux_loss"] = s.aux_loss;
    d["z_loss"] = s.z_loss;
    return d;
  }

  py::dict config() const { return config_dict(layer.config()); }
};

// MoE() takes no keywords beyond its named ones. The experts' b1/b2 switch was once called
// expert_bias, which is also the name of the selection-bias attribute; that keyword is
// refused with its new name.
void refuse_unknown_keywords(const py::kwargs& unknown) {
  for (const auto& item : unknown) {
    const std::string key = py::str(item.first);
    if (key == "expert_bias")
      throw moe::Error(
          "expert_bias: not a constructor keyword; use bias=True/False (whether the experts "
          "have b1/b2). The attribute expert_bias is the selection bias of bias_update_rate");
    throw py::type_error(cat("MoE(): unexpected keyword argument '", key, "'"));
  }
}

std::unique_ptr<PyMoE> make_moe(int64_t d_model, int64_t n_experts, int64_t k,
                                const std::string& expert, const py::object& d_ff,
                                const py::object& d_out, const std::string& activation,
                                const py::object& capacity_factor,
                                const std::string& drop_policy, const std::string& noise,
                                const std::string& noise_scale, double noise_stddev,
                                double aux_alpha, double z_alpha, bool normalize_by_k,
                                bool residual, const std::string& tie_break, const py::int_& seed,
                                bool bias, bool router_bias, double router_init_std,
                                const std::string& router, bool renormalize,
                                double scaling_factor, const std::string& aux_loss,
                                int64_t seq_len, double bias_update_rate, int64_t n_groups,
                                int64_t topk_groups, int64_t n_shared_experts, bool shared_gate,
                                const std::string& second_expert_policy, double jitter,
                                const std::string& precision, const std::string& group_score,
                                bool selection_bias, const py::object& shared_d_ff,
                                double swiglu_alpha, double swiglu_limit,
                                int64_t int4_group, bool int4_zero_points,
                                bool round_router_logits, bool round_gate_weights,
                                bool round_each_op, const py::kwargs& unknown) {
  refuse_unknown_keywords(unknown);
  moe::MoEConfig c;
  c.d_model = d_model;
  c.n_experts = n_experts;
  c.k = k;
  c.expert = moe::parse_expert_kind(expert);
  auto as_int = [](const py::object& v, const char* name) {
    if (py::isinstance<py::bool_>(v) || !py::hasattr(v, "__index__"))
      throw moe::Error(cat(name, ": expected an integer or None, got ", std::string(py::repr(v))));
    return v.cast<int64_t>();
  };
  if (!d_ff.is_none()) {
    c.d_ff = as_int(d_ff, "d_ff");
    MOE_REQUIRE(c.d_ff >= 1, "d_ff: must be at least 1 (None means 4*d_model), got ", c.d_ff);
  }
  if (!d_out.is_none()) {
    c.d_out = as_int(d_out, "d_out");
    MOE_REQUIRE(c.d_out >= 1, "d_out: must be at least 1 (None means d_model), got ", c.d_out);
  }
  c.activation = moe::parse_activation(activation);
  if (!capacity_factor.is_none()) c.capacity_factor = capacity_factor.cast<double>();
  c.drop_policy = moe::parse_drop_policy(drop_policy);
  c.noise = moe::parse_noise(noise);
  c.noise_scale = moe::parse_noise_scale(noise_scale);
  c.noise_stddev = static_cast<float>(noise_stddev);
  c.aux_alpha = static_cast<float>(aux_alpha);
  c.z_alpha = static_cast<float>(z_alpha);
  c.normalize_by_k = normalize_by_k;
  c.residual = residual;
  c.tie_break = moe::parse_tie_break(tie_break);
  c.seed = as_seed(seed);
  c.expert_bias = bias;
  c.router_bias = router_bias;
  c.router_init_std = static_cast<float>(router_init_std);
  c.router_kind = moe::parse_router_kind(router);
  c.renormalize = renormalize;
  c.scaling_factor = static_cast<float>(scaling_factor);
  c.aux_loss_kind = moe::parse_aux_loss(aux_loss);
  c.seq_len = seq_len;
  c.bias_update_rate = static_cast<float>(bias_update_rate);
  c.n_groups = n_groups;
  c.topk_groups = topk_groups;
  c.n_shared_experts = n_shared_experts;
  c.shared_gate = shared_gate;
  c.second_expert_policy = moe::parse_second_expert_policy(second_expert_policy);
  c.jitter = static_cast<float>(jitter);
  c.precision = moe::parse_precision(precision);
  c.group_score = moe::parse_group_score(group_score);
  c.selection_bias = selection_bias;
  if (!shared_d_ff.is_none()) {
    c.shared_d_ff = as_int(shared_d_ff, "shared_d_ff");
    MOE_REQUIRE(c.shared_d_ff >= 1, "shared_d_ff: must be at least 1 (None means d_ff), got ",
                c.shared_d_ff);
  }
  c.swiglu_alpha = static_cast<float>(swiglu_alpha);
  c.swiglu_limit = static_cast<float>(swiglu_limit);
  c.int4_group = int4_group;
  c.int4_zero_points = int4_zero_points;
  c.round_router_logits = round_router_logits;
  c.round_gate_weights = round_gate_weights;
  c.round_each_op = round_each_op;
  return std::make_unique<PyMoE>(c);
}

py::class_<PyMoE> bind_layer(py::module_& m) {
  py::class_<PyMoE> cls(m, "MoE", R"(A Mixture-of-Experts layer (SPEC §2–§4).

Parameters are attributes holding NumPy arrays (W_g, b_g, W_noise, W1, b1, W2, b2, W3, b3 as the
configuration has them). Reading one gives a copy; assigning one copies the values in after
checking the shape. forward(x) → y, backward(dy) → dx accumulating `grads`.)");
  cls.def(py::init(&make_moe), py::arg("d_model"), py::arg("n_experts"), py::arg("k"),
          py::arg("expert") = "mlp", py::arg("d_ff") = py::none(), py::arg("d_out") = py::none(),
          py::arg("activation") = "relu", py::arg("capacity_factor") = py::none(),
          py::arg("drop_policy") = "position", py::arg("noise") = "learned",
          py::arg("noise_scale") = "softplus", py::arg("noise_stddev") = 1.0,
          py::arg("aux_alpha") = 0.01, py::arg("z_alpha") = 0.0,
          py::arg("normalize_by_k") = false, py::arg("residual") = false,
          py::arg("tie_break") = "high", py::arg("seed") = 0, py::arg("bias") = true,
          py::arg("router_bias") = false, py::arg("router_init_std") = 0.0,
          py::arg("router") = "topk_softmax", py::arg("renormalize") = false,
          py::arg("scaling_factor") = 1.0, py::arg("aux_loss") = "switch",
          py::arg("seq_len") = 0, py::arg("bias_update_rate") = 0.0, py::arg("n_groups") = 1,
          py::arg("topk_groups") = 1, py::arg("n_shared_experts") = 0,
          py::arg("shared_gate") = false, py::arg("second_expert_policy") = "all",
          py::arg("jitter") = 0.0, py::arg("precision") = "fp32",
          py::arg("group_score") = "top2_sum", py::arg("selection_bias") = false,
          py::arg("shared_d_ff") = py::none(), py::arg("swiglu_alpha") = 1.702,
          py::arg("swiglu_limit") = 7.0, py::arg("int4_group") = 128,
          py::arg("int4_zero_points") = false, py::arg("round_router_logits") = false,
          py::arg("round_gate_weights") = false, py::arg("round_each_op") = false);
  for (const char* name : kParamNames) {
    const std::string n = name;
    cls.def_property(
        name, [n](const PyMoE& self) { return self.get(n); },
        [n](PyMoE& self, const py::object& v) { self.set(n, v); });
  }
  cls.def("forward", &PyMoE::forward, py::arg("x"), py::arg("noise") = py::none(),
          py::arg("training") = py::none(), py::arg("step") = py::none(),
          py::arg("token_offset") = 0,
          R"(y = MoE(x) (plus x with residual). x is (T, d_model) or one token (d_model).
training: defaults to True for a layer that can train (fp32 masters, precision fp32 or bf16)
and to False for an evaluation-only one (from_pretrained without masters, drop_masters(),
precision int8).
noise: a given ε (T, n_experts); otherwise, in training, ε is drawn from (seed, step,
token_offset + t, expert). step defaults to a counter that advances on every training
forward, so each step draws fresh noise; pass it to pin the draw.)");
  cls.def("__call__", &PyMoE::forward, py::arg("x"), py::arg("noise") = py::none(),
          py::arg("training") = py::none(), py::arg("step") = py::none(),
          py::arg("token_offset") = 0);
  cls.def("experts_forward", &PyMoE::experts_forward, py::arg("x"), py::arg("indices"),
          py::arg("weights"),
          R"(The routed experts alone with the caller's routing: y[t] = Σ_j weights[t, j] ·
expert_{indices[t, j]}(x[t]). x is (T, d_model); indices (T, k) integers in 0..n_experts-1;
weights (T, k). No router, shared experts, residual or capacity. Returns y (T, d_out);
experts_backward(dy) goes back through it (backward() does not).)");
  cls.def("experts_backward", &PyMoE::experts_backward, py::arg("dy"),
          R"(The backward of the last experts_forward, once: dy (T, d_out) → (dx (T, d_model),
dweights (T, k)); the routed experts' gradients accumulate into `grads`.)");
  cls.def("backward", &PyMoE::backward, py::arg("dy"),
          "dx for dy = ∂L/∂y of the last forward; parameter gradients (with the aux and z "
          "loss terms) accumulate into `grads` until zero_grad().");
  cls.def("zero_grad", [](PyMoE& self) { self.layer.zero_grad(); });
  cls.def("drop_masters", [](PyMoE& self) { self.layer.drop_masters(); },
          "Makes the expert matrices' copies in the layer's precision from the fp32 masters, "
          "then frees the masters: the layer becomes evaluation-only (as from_pretrained "
          "without masters; W1/W2/W3 are no longer attributes in bf16 and int8). Nothing to "
          "do in fp32.");
  cls.def("expert_matrix",
          [](const PyMoE& self, const std::string& name) {
            return tensor_to_numpy(self.layer.expert_matrix(name));
          },
          py::arg("name"),
          "Expert matrix `name` (W1, W2, W3, Ws1, Ws2, Ws3) as float32 (E, in, out) from "
          "whatever the layer holds: the masters, or the bf16 / int8 weights of a layer "
          "without them (bf16 widened exactly, int8 as q·scale).");
  cls.def_property_readonly(
      "holds_masters", [](const PyMoE& self) { return self.layer.holds_masters(); },
      "Whether the expert matrices are held as fp32 masters (always in fp32).");
  // The DeepSeek-V3 selection bias; the constructor's bias=True says whether b1/b2 exist.
  cls.def_property(
      "expert_bias", [](const PyMoE& self) { return tensor_to_numpy(self.layer.expert_bias()); },
      [](PyMoE& self, const py::object& v) {
        moe::Tensor& b = self.layer.expert_bias();
        FArray a = as_f32(v, "expert_bias");
        std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
        if (got != b.shape)
          throw moe::Error(cat("expert_bias: expected shape ", moe::shape_str(b.shape), ", got ",
                               moe::shape_str(got)));
        std::copy(a.data(), a.data() + a.size(), b.ptr());
      },
      "(n_experts) selection bias of bias_update_rate > 0 (a copy; zeros when off), added to "
      "the scores when choosing experts, never to the gate weights. Not the constructor's "
      "bias flag, which says whether the experts have b1/b2.");
  cls.def("update_expert_bias", [](PyMoE& self) { self.layer.update_expert_bias(); },
          "b_i += bias_update_rate·sign(mean load - load_i) from the last training forward's "
          "load (before capacity); call once after each optimizer step. No-op when the rate "
          "is 0 or no training forward came since the last update.");
  cls.def("set_rounding",
          [](PyMoE& self, bool router_logits, bool gate_weights, bool each_op,
             const std::string& tie_break) {
            self.layer.set_rounding(router_logits, gate_weights, each_op,
                                    moe::parse_tie_break(tie_break));
          },
          py::arg("round_router_logits"), py::arg("round_gate_weights"),
          py::arg("round_each_op"), py::arg("tie_break"),
          "Changes the rounding switches and tie_break of a built layer (as the keywords of "
          "the same names set them; what moe.hf.replace_moe_blocks does for a bf16 model's "
          "blocks: docs/routing.md, \"Rounding as transformers\").");
  cls.def("weights_changed", [](PyMoE& self) { self.layer.weights_changed(); },
          "precision bf16 / int8: the bf16 / int8 copies of the expert weights are made again "
          "at the next forward. Assigning a parameter and backward() already do this.");
  cls.def_property_readonly("grads", [](PyMoE& self) { return self.as_dict(true); },
                            "dict name → gradient (a copy)");
  cls.def("parameters", [](PyMoE& self) { return self.as_dict(false); },
          "dict name → parameter (a copy)");
  cls.def_property_readonly("parameter_names",
                            [](const PyMoE& self) { return self.layer.parameter_names(); });
  cls.def("reset_global_load", [](PyMoE& self) { self.layer.reset_global_load(); },
          "aux_loss='global': forget the expert loads accumulated by training forwards (call "
          "after each optimizer step).");
  cls.def_property_readonly("aux_loss", [](const PyMoE& self) { return self.layer.aux_loss(); });
  cls.def_property_readonly("z_loss", [](const PyMoE& self) { return self.layer.z_loss(); });
  cls.def_property_readonly("stats", &PyMoE::stats);
  cls.def_property_readonly("routing", [](const PyMoE& self) {
    return routing_of(self.layer.routing());
  }, "moe.Routing of the last forward");
  cls.def_property_readonly("config", &PyMoE::config);
  cls.def_property("step", [](const PyMoE& self) { return self.step; },
                   [](PyMoE& self, const py::int_& v) { self.step = as_seed(v); },
                   "noise counter of the next training forward that is given no step");
  for (const char* f : {"d_model", "n_experts", "k", "d_out", "expert", "residual"}) {
    const std::string key = f;
    cls.def_property_readonly(f, [key](const PyMoE& self) { return py::object(self.config()[key.c_str()]); });
  }
  cls.def("__repr__", [](const PyMoE& self) {
    const moe::MoEConfig& c = self.layer.config();
    return cat("moe.MoE(d_model=", c.d_model, ", n_experts=", c.n_experts, ", k=", c.k,
               ", expert='", moe::to_string(c.expert), "')");
  });
  return cls;
}

// ---- checkpoints and optimizers ---------------------------------------------------------

std::map<std::string, std::string> as_metadata(const py::object& md) {
  std::map<std::string, std::string> out;
  if (md.is_none()) return out;
  if (!py::isinstance<py::dict>(md)) throw moe::Error("metadata: expected a dict of str → str");
  for (auto item : md.cast<py::dict>()) {
    if (!py::isinstance<py::str>(item.first) || !py::isinstance<py::str>(item.second))
      throw moe::Error(cat("metadata: keys and values must be str, got ",
                           std::string(py::repr(item.first)), ": ",
                           std::string(py::repr(item.second))));
    out[item.first.cast<std::string>()] = item.second.cast<std::string>();
  }
  return out;
}

py::dict metadata_dict(const std::map<std::string, std::string>& md) {
  py::dict d;
  for (const auto& [k, v] : md) d[py::str(k)] = py::str(v);
  return d;
}

std::string as_path(const py::object& path) {
  return py::str(py::module_::import("os").attr("fspath")(path)).cast<std::string>();
}

// An optimizer over the parameters of one moe.MoE, or of a list of them (names prefixed
// "0.", "1.", …). It keeps the layers alive: it holds pointers to their tensors.
struct PyOptimizer {
  std::unique_ptr<moe::Optimizer> opt;
  py::list layers;
};

std::vector<moe::ParamRef> collect_params(const py::object& params, py::list& keep) {
  std::vector<moe::ParamRef> refs;
  if (py::isinstance<PyMoE>(params)) {
    keep.append(params);
    return moe::layer_params(params.cast<PyMoE&>().layer);
  }
  if (py::isinstance<py::list>(params) || py::isinstance<py::tuple>(params)) {
    size_t i = 0;
    for (auto item : params) {
      if (!py::isinstance<PyMoE>(item))
        throw moe::Error(cat("params: item ", i, " is not a moe.MoE"));
      keep.append(item);
      for (auto& r : moe::layer_params(item.cast<PyMoE&>().layer, cat(i, ".")))
        refs.push_back(std::move(r));
      ++i;
    }
    if (i == 0) throw moe::Error("params: empty list");
    return refs;
  }
  throw moe::Error("params: expected a moe.MoE or a list of them");
}

moe::Optimizer* optimizer_of(const py::object& o) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<PyOptimizer>(o)) throw moe::Error("optimizer: expected a moe optimizer");
  return o.cast<PyOptimizer&>().opt.get();
}

void bind_io(py::module_& m, py::class_<PyMoE>& cls) {
  cls.def("save", [](const PyMoE& self, const py::object& path, const py::object& metadata,
                     const py::object& optimizer) {
    moe::CheckpointExtras ex;
    ex.metadata = as_metadata(metadata);
    ex.optimizer = optimizer_of(optimizer);
    const std::string p = as_path(path);
    py::gil_scoped_release nogil;
    moe::save_checkpoint(self.layer, p, ex);
  }, py::arg("path"), py::arg("metadata") = py::none(), py::arg("optimizer") = py::none(),
     "Write every parameter (and the config, metadata and optimizer state) to a safetensors "
     "file, atomically. A layer without masters writes its expert matrices from the weights "
     "it holds (expert_matrix), so the file loads like any other.");
  cls.def("load", [](PyMoE& self, const py::object& path, const py::object& optimizer) {
    moe::Optimizer* opt = optimizer_of(optimizer);
    const std::string p = as_path(path);
    moe::SafetensorsFile f;
    {
      py::gil_scoped_release nogil;
      f = moe::load_checkpoint(self.layer, p, opt);
    }
    return metadata_dict(f.metadata);
  }, py::arg("path"), py::arg("optimizer") = py::none(),
     "Read the parameters (and the optimizer's state) from a checkpoint; the layer changes "
     "only when the whole file checks out. Returns the file's metadata.");
  cls.def_static("from_checkpoint", [](const py::object& path) {
    const std::string p = as_path(path);
    auto self = std::make_unique<PyMoE>(moe::read_checkpoint_config(p));
    moe::load_checkpoint(self->layer, p);
    return self;
  }, py::arg("path"), "A layer made from the config stored in a checkpoint, with its weights.");

  m.def("load_safetensors", [](const py::object& path) {
    moe::SafetensorsFile f = moe::load_safetensors(as_path(path));
    py::dict tensors;
    for (const auto& t : f.tensors) tensors[py::str(t.name)] = tensor_to_numpy(t.tensor);
    return py::make_tuple(tensors, metadata_dict(f.metadata));
  }, py::arg("path"), "(tensors: dict name → float32 array, metadata: dict) of a file.");
  m.def("save_safetensors", [](const py::object& path, const py::dict& tensors,
                               const py::object& metadata) {
    std::vector<moe::Tensor> owned;
    owned.reserve(tensors.size());
    std::vector<std::pair<std::string, const moe::Tensor*>> list;
    for (auto item : tensors) {
      const std::string name = py::str(item.first);
      FArray a = as_f32(item.second, name.c_str());
      moe::Tensor t(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
      std::copy(a.data(), a.data() + a.size(), t.ptr());
      owned.push_back(std::move(t));
    }
    size_t i = 0;
    for (auto item : tensors) list.emplace_back(py::str(item.first), &owned[i++]);
    moe::save_safetensors(as_path(path), list, as_metadata(metadata));
  }, py::arg("path"), py::arg("tensors"), py::arg("metadata") = py::none(),
     "Write a dict name → array as float32 safetensors, atomically.");

  py::class_<PyOptimizer> opt(m, "Optimizer", "Base of moe.SGD, moe.Adam and moe.AdamW.");
  opt.def("step", [](PyOptimizer& self) {
       py::gil_scoped_release nogil;
       self.opt->step();
     }, "One update from the current gradients.")
      .def("zero_grad", [](PyOptimizer& self) { self.opt->zero_grad(); })
      .def_property("lr", [](const PyOptimizer& self) { return self.opt->lr(); },
                    [](PyOptimizer& self, double lr) { self.opt->set_lr(lr); })
      .def_property_readonly("step_count",
                             [](const PyOptimizer& self) { return self.opt->step_count(); })
      .def_property_readonly("kind", [](const PyOptimizer& self) { return self.opt->kind(); })
      .def_property_readonly("param_names", [](const PyOptimizer& self) {
        std::vector<std::string> n;
        for (const auto& r : self.opt->params()) n.push_back(r.name);
        return n;
      })
      .def("__repr__", [](const PyOptimizer& self) {
        return cat("moe.", self.opt->kind(), "(lr=", self.opt->lr(), ", ",
                   self.opt->params().size(), " tensors)");
      });

  m.def("SGD", [](const py::object& params, double lr, double momentum, double dampening,
                  bool nesterov, double weight_decay) {
    PyOptimizer o;
    auto refs = collect_params(params, o.layers);
    moe::SGDConfig c;
    c.lr = lr;
    c.momentum = momentum;
    c.dampening = dampening;
    c.nesterov = nesterov;
    c.weight_decay = weight_decay;
    o.opt = std::make_unique<moe::SGD>(std::move(refs), c);
    return o;
  }, py::arg("params"), py::arg("lr") = 0.01, py::arg("momentum") = 0.0,
     py::arg("dampening") = 0.0, py::arg("nesterov") = false, py::arg("weight_decay") = 0.0,
     "SGD with momentum as torch.optim.SGD, over a moe.MoE (or a list of them).");
  auto adam = [](const py::object& params, double lr, std::pair<double, double> betas,
                 double eps, double weight_decay, bool decoupled) {
    PyOptimizer o;
    auto refs = collect_params(params, o.layers);
    moe::AdamConfig c;
    c.lr = lr;
    c.beta1 = betas.first;
    c.beta2 = betas.second;
    c.eps = eps;
    c.weight_decay = weight_decay;
    c.decoupled_weight_decay = decoupled;
    o.opt = std::make_unique<moe::Adam>(std::move(refs), c);
    return o;
  };
  m.def("Adam", [adam](const py::object& params, double lr, std::pair<double, double> betas,
                       double eps, double weight_decay) {
    return adam(params, lr, betas, eps, weight_decay, false);
  }, py::arg("params"), py::arg("lr") = 1e-3, py::arg("betas") = std::make_pair(0.9, 0.999),
     py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0,
     "Adam as torch.optim.Adam (L2 weight decay added to the gradient).");
  m.def("AdamW", [adam](const py::object& params, double lr, std::pair<double, double> betas,
                        double eps, double weight_decay) {
    return adam(params, lr, betas, eps, weight_decay, true);
  }, py::arg("params"), py::arg("lr") = 1e-3, py::arg("betas") = std::make_pair(0.9, 0.999),
     py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.01,
     "AdamW as torch.optim.AdamW (decoupled weight decay).");
  m.def("clip_grad_norm", [](const py::object& params, double max_norm) {
    py::list keep;
    auto refs = collect_params(params, keep);
    return moe::clip_grad_norm(refs, max_norm);
  }, py::arg("params"), py::arg("max_norm"),
     "Scale the gradients so that their global L2 norm is at most max_norm (as "
     "torch.nn.utils.clip_grad_norm_); returns the norm before clipping.");
}

// ---- moe.torch support -------------------------------------------------------------------
// What python/moe/torch.py needs beyond moe.MoE: zero-copy views of the layer's parameter and
// gradient buffers (they keep the layer alive), and the layer's float64 reference twin
// (layer/layer_ref.hpp) as the oracle of moe.torch's gradient checks.

py::array buffer_view(py::object owner, moe::Tensor& t) {
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end()), strides(shape.size());
  py::ssize_t s = sizeof(float);
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return py::array_t<float>(shape, strides, t.ptr(), owner);  // base = owner: no copy
}

using DArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

DArray as_f64(const py::handle& obj, const std::string& name, std::vector<int64_t> want) {
  if (obj.is_none()) throw moe::Error(cat(name, ": expected an array, got None"));
  DArray a = DArray::ensure(obj);
  if (!a) throw moe::Error(cat(name, ": expected a numeric array"));
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != want)
    throw moe::Error(cat(name, ": expected shape ", moe::shape_str(want), ", got ",
                         moe::shape_str(got)));
  return a;
}

py::array_t<double> f64_numpy(const std::vector<double>& v, std::vector<py::ssize_t> shape) {
  py::array_t<double> a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// One forward (and, given dy, one backward) of the float64 twin with the layer's config and
// the given parameters. The backward's objective is <dy, y> + aux_scale·aux_loss +
// z_scale·z_loss: the twin takes its loss coefficients from the config, so scaling them
// gives each term exactly.
py::dict reference_f64(PyMoE& self, const py::object& x_, const py::dict& params,
                       const py::object& noise_, bool training, const py::object& dy_,
                       double aux_scale, double z_scale, const py::int_& step) {
  moe::MoEConfig c = self.layer.config();
  MOE_REQUIRE(c.router_kind != moe::RouterKind::expert_choice,
              "router: the float64 reference covers token-choice routers, not 'expert_choice'");
  MOE_REQUIRE(!training || c.jitter == 0.0f,
              "jitter: the float64 reference has no jitter input; use training=False or jitter=0");
  const int64_t d = c.d_model, E = c.n_experts, Do = c.out_dim();
  DArray x = DArray::ensure(x_);
  if (!x || x.ndim() != 2 || x.shape(1) != d)
    throw moe::Error(cat("x: expected a 2-D array (T, ", d, ")"));
  const int64_t T = x.shape(0);
  using Ref = moe::detail::RefParams<double>;
  Ref p;
  for (const auto& n : self.layer.parameter_names()) {
    if (!params.contains(n)) throw moe::Error(cat("params: missing ", n));
    DArray a = as_f64(params[py::str(n)], n, self.layer.param(n).shape);
    p.get(n).assign(a.data(), a.data() + a.size());
  }
  DArray eps;
  const bool noisy = training && c.noise != moe::Noise::none;
  if (noisy) {
    MOE_REQUIRE(!noise_.is_none(), "noise: the float64 reference needs the noise ε (T, ", E,
                ") of a noisy training forward");
    eps = as_f64(noise_, "noise", {T, E});
  }
  const uint64_t s = as_seed(step);
  std::vector<double> y;
  moe::detail::RefSaved<double> sv;
  {
    py::gil_scoped_release nogil;
    moe::detail::layer_forward_ref<double>(y, sv, x.data(), p, c, T, training,
                                           noisy ? eps.data() : nullptr, s);
  }
  py::dict out;
  out["y"] = f64_numpy(y, {T, Do});
  out["aux_loss"] = sv.aux_loss;
  out["z_loss"] = sv.z_loss;
  if (!dy_.is_none()) {
    DArray dy = as_f64(dy_, "dy", {T, Do});
    c.aux_alpha = static_cast<float>(c.aux_alpha * aux_scale);
    c.z_alpha = static_cast<float>(c.z_alpha * z_scale);
    std::vector<double> dx;
    Ref g = Ref::zeros_like(self.layer);
    {
      py::gil_scoped_release nogil;
      moe::detail::layer_backward_ref<double>(dx, g, dy.data(), sv, p, c);
    }
    out["dx"] = f64_numpy(dx, {T, d});
    py::dict grads;
    for (const auto& n : self.layer.parameter_names()) {
      const auto& shape = self.layer.param(n).shape;
      grads[py::str(n)] = f64_numpy(g.get(n), std::vector<py::ssize_t>(shape.begin(), shape.end()));
    }
    out["grads"] = grads;
  }
  return out;
}

// SPEC §7: pretrained MoE blocks (include/moe/pretrained.hpp).
void bind_pretrained(py::module_& m, py::class_<PyMoE>& cls) {
  cls.def_static("from_pretrained", [](const py::object& path, int64_t layer,
                                       const std::string& precision, bool masters) {
    const std::string p = as_path(path);
    const bool automatic = precision == "auto";
    moe::Precision prec = moe::Precision::bf16;
    if (!automatic) {
      try {
        prec = moe::parse_precision(precision);
      } catch (const moe::Error&) {  // from_pretrained also takes "auto"
        throw moe::Error(cat("precision: unknown value '", precision,
                             "' (expected auto, fp32, bf16, int8, int4, mxfp4 or fp8)"));
      }
    }
    moe::LayerOptions opt;
    opt.masters = masters;
    std::unique_ptr<PyMoE> self;
    {
      py::gil_scoped_release nogil;
      self = std::make_unique<PyMoE>(
          automatic ? moe::load_pretrained(p, layer, moe::precision_auto, opt)
                    : moe::load_pretrained(p, layer, prec, opt));
    }
    return self;
  }, py::arg("path"), py::arg("layer"), py::arg("precision") = "bf16", py::arg("masters") = false,
     "The MoE block of decoder layer `layer` of a Hugging Face model folder (config.json, "
     "*.safetensors, the index when sharded), reading only that layer's tensors; its "
     "evaluation forward equals the family's transformers module (docs/models.md). With "
     "masters=False (the default) the expert matrices are held in `precision` only: an "
     "evaluation-only layer (its forward(x) evaluates) without W1/W2/W3 attributes in bf16. "
     "masters=True keeps fp32 masters (trainable, three times the memory in bf16). "
     "precision='auto' keeps the format the folder stores the experts in (BF16/F16/F32 "
     "files: bf16; FP8: fp8; MXFP4: mxfp4; GPTQ/AWQ: int4), the low-bit bytes as stored.");
  m.def("inspect_pretrained", [](const py::object& path) {
    const moe::PretrainedInfo i = moe::inspect_pretrained(as_path(path));
    py::dict d;
    d["family"] = i.family;
    d["layers"] = i.n_layers;
    d["moe_layers"] = i.moe_layers;
    d["dense_layers"] = i.dense_layers;
    d["n_experts"] = i.n_experts;
    d["k"] = i.k;
    d["d_model"] = i.d_model;
    d["d_ff"] = i.d_ff;
    d["expert"] = i.expert;
    d["router"] = i.router;
    d["n_shared_experts"] = i.n_shared_experts;
    d["shared_d_ff"] = i.shared_d_ff;
    d["shared_gate"] = i.shared_gate;
    d["layout"] = i.layout;
    d["dtypes"] = i.dtypes;
    d["expert_format"] = i.expert_format;
    d["auto_precision"] = i.auto_precision;
    d["file_bytes_per_block"] = i.file_bytes_per_block;
    d["bf16_bytes_per_block"] = i.bf16_bytes_per_block;
    d["fp32_bytes_per_block"] = i.fp32_bytes_per_block;
    d["files"] = i.files;
    d["config"] = config_dict(i.config);
    return d;
  }, py::arg("path"),
     "What `moe inspect` prints about a model folder, as a dict: family, layers, moe_layers, "
     "dense_layers, n_experts, k, d_model, d_ff, expert, router, n_shared_experts, "
     "shared_d_ff, shared_gate, layout, dtypes, bytes per block, files, config (of the first "
     "MoE block). Reads config.json and the safetensors headers only.");
}

void bind_torch_support(py::class_<PyMoE>& cls) {
  cls.def("_buffer", [](py::object self, const std::string& name, bool grad) {
    PyMoE& m = self.cast<PyMoE&>();
    if (!m.has(name)) throw py::attribute_error(cat("MoE has no parameter ", name));
    return buffer_view(self, grad ? m.layer.grad(name) : m.layer.param(name));
  }, py::arg("name"), py::arg("grad") = false,
     "A writable float32 view (no copy) of a parameter's buffer, or of its gradient's; it "
     "keeps the layer alive. For moe.torch.");
  cls.def("_take_grad", [](PyMoE& self, const std::string& name) {
    if (!self.has(name)) throw py::attribute_error(cat("MoE has no parameter ", name));
    moe::Tensor& g = self.layer.grad(name);
    // The gradient's storage moves to the array (no copy); the layer gets a zeroed one: a
    // buffer torch has given back when there is one of the size, else a fresh one.
    struct Held {
      std::vector<float> v;
      std::weak_ptr<GradPool> pool;
    };
    auto* held = new Held{std::move(g.data), self.grad_pool};
    std::vector<float> next;
    {
      std::lock_guard<std::mutex> lock(self.grad_pool->m);
      auto& free = self.grad_pool->free;
      for (auto it = free.begin(); it != free.end(); ++it)
        if (it->size() == held->v.size()) {
          next = std::move(*it);
          free.erase(it);
          break;
        }
    }
    if (next.size() == held->v.size())
      std::fill(next.begin(), next.end(), 0.0f);
    else
      next.assign(held->v.size(), 0.0f);
    g.data = std::move(next);
    py::capsule free_it(held, [](void* v) {
      auto* h = static_cast<Held*>(v);
      if (auto pool = h->pool.lock()) {
        std::lock_guard<std::mutex> lock(pool->m);
        if (pool->free.size() < 64) pool->free.push_back(std::move(h->v));
      }
      delete h;
    });
    std::vector<py::ssize_t> shape(g.shape.begin(), g.shape.end());
    return py::array_t<float>(shape, held->v.data(), free_it);
  }, py::arg("name"),
     "The gradient buffer of a parameter as a float32 array that owns it (no copy); the "
     "layer's gradient starts again from zeros. For moe.torch.");
  cls.def("_buffer_address", [](PyMoE& self, const std::string& name, bool grad) {
    if (!self.has(name)) throw py::attribute_error(cat("MoE has no parameter ", name));
    const moe::MoELayer& layer = self.layer;  // const: reading an address changes nothing
    return reinterpret_cast<uintptr_t>(grad ? self.layer.grad(name).ptr()
                                            : layer.param(name).ptr());
  }, py::arg("name"), py::arg("grad") = false);
  cls.def("_reference_f64", &reference_f64, py::arg("x"), py::arg("params"),
          py::arg("noise") = py::none(), py::arg("training") = true, py::arg("dy") = py::none(),
          py::arg("aux_scale") = 1.0, py::arg("z_scale") = 1.0, py::arg("step") = 0,
          "The float64 reference twin of this layer's config on the given float64 parameters: "
          "{'y', 'aux_loss', 'z_loss'} and, given dy, {'dx', 'grads'} of <dy, y> + "
          "aux_scale·aux_loss + z_scale·z_loss. For moe.torch's gradient checks.");
}

}  // namespace

PYBIND11_MODULE(_moe, m) {
  m.doc() = "libmoe: Mixture-of-Experts layers (native part of the `moe` package)";
  // moe.Error is a ValueError: `except ValueError` catches every validation failure.
  py::register_exception<moe::Error>(m, "Error", PyExc_ValueError);

  m.def("set_num_threads", [](int n) {
    MOE_REQUIRE(n >= 1, "n: number of threads must be >= 1, got ", n);
    omp_set_num_threads(n);
  }, py::arg("n"), "Set the number of OpenMP threads used by libmoe.");
  m.def("cpu_info", []() {
    const moe::detail::CpuInfo& c = moe::detail::cpu();
    py::dict d;
    d["cpu"] = c.model;
    d["best"] = moe::detail::isa_name(c.best);
    d["level"] = moe::detail::isa_name(c.level);
    d["max_isa"] = c.cap;
    d["amx_emulated"] = c.amx_emulated;
    d["amx_min_rows"] = c.amx_min_rows;
    d["isa"] = moe::detail::cpu_isa_name();
    d["bf16_experts"] = moe::detail::gemm_bf16_packed_impl();
    d["int8_kernel"] = moe::detail::int8_kernel_name();
    py::dict lowbit;
    for (moe::Precision p : {moe::Precision::int4, moe::Precision::mxfp4, moe::Precision::fp8})
      lowbit[moe::to_string(p)] = moe::detail::lowbit_kernel_names(p);
    d["lowbit_kernels"] = lowbit;
    moe::detail::QuantMatrix tile16;  // int4 of 16 columns: held tiled where the layer tiles
    tile16.N = 16;
    d["lowbit_tiled"] = moe::detail::quant_tiling_wanted(tile16);
    d["vbmi"] = moe::detail::quant_vbmi();
    return d;
  }, "What runs on this CPU: its name ('cpu'), the highest kernel level it supports ('best': "
     "avx2, avx512, avx512_bf16 or amx) and the level in use ('level', lowered by "
     "MOE_MAX_ISA, given as 'max_isa'), whether the AMX kernels run on their C++ emulation "
     "('amx_emulated', MOE_AMX_EMULATE=1, tests only) and from how many rows per product "
     "('amx_min_rows', MOE_AMX_MIN_ROWS), the ISA oneDNN uses for the fp32 products ('isa'), "
     "and the kernels of the bf16 expert products ('bf16_experts'), of int8 "
     "('int8_kernel') and of the low-bit formats ('lowbit_kernels': int4 (group 128), mxfp4, "
     "fp8, at decode and at prefill), and whether a layer holds its int4 and mxfp4 matrices "
     "of N a multiple of 16 in the tiled layout of the avx512_vnni decode ('lowbit_tiled'; "
     "that decode rounds its rows to int8 per min(block, 128) values, mxfp4's per 128 where 'vbmi', "
     "else per 32), and whether the decode kernels that need AVX512-VBMI run ('vbmi': fp8's "
     "vpermi2b widening, mxfp4's shared exponents; MOE_VBMI=0 turns them off).");
  m.def("get_num_threads", []() { return omp_get_max_threads(); },
        "Number of OpenMP threads libmoe uses.");

  m.def("noisy_top_k_gating", &py_noisy_top_k_gating, py::arg("logits"), py::arg("k"),
        py::arg("noise_stddev") = 1.0, py::arg("training") = true, py::arg("seed") = 0,
        "Dense gates of noisy top-k gating (fixed noise σ, none at evaluation), ties to the "
        "higher expert index. logits is (E) or (T, E); returns the same shape.");

  py::class_<RouteResult>(m, "Routing", "What moe.route returns.")
      .def_readonly("gates", &RouteResult::gates, "(T, E) dense gates, k non-zero per row")
      .def_readonly("indices", &RouteResult::indices, "(T, k) int32 expert indices, best first")
      .def_readonly("weights", &RouteResult::weights, "(T, k) gate weights of the kept experts")
      .def_readonly("probs", &RouteResult::probs, "(T, E) softmax over all noisy logits")
      .def_readonly("noisy_logits", &RouteResult::noisy_logits, "(T, E) H")
      .def_readonly("logits", &RouteResult::logits, "(T, E) h = X·W_g")
      .def_readonly("eps", &RouteResult::eps, "(T, E) ε used, or None without noise")
      .def_readonly("jitter", &RouteResult::jitter,
                    "(T, d_model) router-input factors of jitter, or None without it")
      .def_readonly("ec_tokens", &RouteResult::ec_tokens,
                    "router 'expert_choice': (E, C) int32 tokens each expert chose, best "
                    "first; else None")
      .def_readonly("ec_gates", &RouteResult::ec_gates,
                    "router 'expert_choice': (E, C) their gates probs[t, e]; else None")
      .def("__repr__", [](const RouteResult& r) {
        return cat("Routing(T=", r.gates.shape(0), ", E=", r.gates.shape(1),
                   ", k=", r.indices.shape(1), ")");
      });

  m.def("route", &py_route, py::arg("X"), py::arg("W_g"), py::arg("k"),
        py::arg("W_noise") = py::none(), py::arg("noise") = py::none(),
        py::arg("noise_scale") = "softplus", py::arg("tie_break") = "high",
        py::arg("training") = true, py::arg("seed") = 0,
        "Route tokens X (T, d) with W_g (d, E): learned noise when W_noise is given (noise is "
        "a given ε (T, E), else drawn from the seed), KeepTopK(k), softmax over the kept.");

  m.def("load_balancing_loss", &py_load_balancing_loss, py::arg("indices"), py::arg("probs"),
        py::arg("n_experts"), py::arg("alpha") = 0.01, py::arg("normalize_by_k") = false,
        "α·E·Σ f_i·P_i: f from the hard top-k indices (T, k), P the mean of probs (T, E).");
  auto cls = bind_layer(m);
  bind_io(m, cls);
  bind_pretrained(m, cls);
  bind_torch_support(cls);
}
