// The `moe` Python package's native part (SPEC §5): NumPy arrays in and out, any float
// dtype or layout accepted by converting to C-contiguous float32 once at the boundary.
// moe::Error becomes moe.Error, a subclass of ValueError carrying the same message.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "moe/moe.hpp"

// The layer (src/layer, src/losses) lands separately; until then its bindings stay out.
#ifndef MOE_PY_HAVE_LAYER
#define MOE_PY_HAVE_LAYER 0
#endif

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
  return FArray::ensure(a);
}

FArray as_f32_2d(const py::handle& obj, const char* name, const char* dims) {
  FArray a = as_f32(obj, name);
  if (a.ndim() != 2)
    throw moe::Error(cat(name, ": expected a 2-D array ", dims, ", got shape ", shape_of(a)));
  return a;
}

[[maybe_unused]] IArray as_i32_2d(const py::handle& obj, const char* name, const char* dims) {
  if (obj.is_none()) throw moe::Error(cat(name, ": expected an array, got None"));
  py::array a = py::array::ensure(obj);
  if (!a) throw moe::Error(cat(name, ": expected an integer array"));
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw moe::Error(cat(name, ": expected an integer array, got dtype ",
                         std::string(py::str(a.dtype()))));
  if (a.ndim() != 2)
    throw moe::Error(cat(name, ": expected a 2-D array ", dims, ", got shape ", shape_of(a)));
  return IArray::ensure(a);
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
};

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
  RouteResult r;
  r.gates = to_numpy(s.dense_gates(), {T, E});
  r.weights = to_numpy(s.weights, {T, k});
  r.probs = to_numpy(s.probs, {T, E});
  r.noisy_logits = to_numpy(s.noisy, {T, E});
  r.logits = to_numpy(s.logits, {T, E});
  r.indices = py::array_t<int32_t>(std::vector<py::ssize_t>{T, k});
  std::copy(s.indices.begin(), s.indices.end(), r.indices.mutable_data());
  r.eps = s.eps.empty() ? py::object(py::none()) : py::object(to_numpy(s.eps, {T, E}));
  return r;
}

#if MOE_PY_HAVE_LAYER
double py_load_balancing_loss(const py::object& indices_, const py::object& probs_,
                              int64_t n_experts, double alpha, bool normalize_by_k) {
  IArray idx = as_i32_2d(indices_, "indices", "(T, k)");
  FArray probs = as_f32_2d(probs_, "probs", "(T, n_experts)");
  const int64_t T = idx.shape(0), k = idx.shape(1);
  MOE_REQUIRE(n_experts >= 1, "n_experts: must be at least 1, got ", n_experts);
  require_shape(probs, "probs", {T, n_experts}, "(T, n_experts)");
  MOE_REQUIRE(k >= 1 && k <= n_experts, "indices: k (columns) must be in 1..", n_experts,
              " (n_experts), got ", k);
  const int32_t* ip = idx.data();
  for (int64_t i = 0; i < T * k; ++i)
    MOE_REQUIRE(ip[i] >= 0 && ip[i] < n_experts, "indices: expert index out of range 0..",
                n_experts - 1, " at token ", i / k, ", got ", ip[i]);
  return moe::load_balancing_loss(nullptr, idx.data(), probs.data(), T, k, n_experts, alpha,
                                  normalize_by_k);
}
#endif

}  // namespace

PYBIND11_MODULE(_moe, m) {
  m.doc() = "libmoe: Mixture-of-Experts layers (native part of the `moe` package)";
  // moe.Error is a ValueError: `except ValueError` catches every validation failure.
  py::register_exception<moe::Error>(m, "Error", PyExc_ValueError);

  m.def("set_num_threads", [](int n) {
    MOE_REQUIRE(n >= 1, "n: number of threads must be >= 1, got ", n);
    omp_set_num_threads(n);
  }, py::arg("n"), "Set the number of OpenMP threads used by libmoe.");
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

#if MOE_PY_HAVE_LAYER
  m.def("load_balancing_loss", &py_load_balancing_loss, py::arg("indices"), py::arg("probs"),
        py::arg("n_experts"), py::arg("alpha") = 0.01, py::arg("normalize_by_k") = false,
        "α·E·Σ f_i·P_i: f from the hard top-k indices (T, k), P the mean of probs (T, E).");
#endif
}
