#include "moe/router.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/check.hpp"
#include "common/gemm.hpp"
#include "moe/tensor.hpp"
#include "router/philox.hpp"
#include "router/router_rows.hpp"

namespace moe {

using detail::cat;

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Noise parse_noise(const std::string& s) {
  if (s == "none") return Noise::none;
  if (s == "fixed") return Noise::fixed;
  if (s == "learned") return Noise::learned;
  throw Error(cat("noise: unknown mode '", s, "' (expected none, fixed or learned)"));
}
NoiseScale parse_noise_scale(const std::string& s) {
  if (s == "softplus") return NoiseScale::softplus;
  if (s == "linear") return NoiseScale::linear;
  throw Error(cat("noise_scale: unknown value '", s, "' (expected softplus or linear)"));
}
TieBreak parse_tie_break(const std::string& s) {
  if (s == "high") return TieBreak::high;
  if (s == "low") return TieBreak::low;
  throw Error(cat("tie_break: unknown value '", s, "' (expected high or low)"));
}
const char* to_string(Noise v) {
  return v == Noise::none ? "none" : v == Noise::fixed ? "fixed" : "learned";
}
const char* to_string(NoiseScale v) { return v == NoiseScale::softplus ? "softplus" : "linear"; }
const char* to_string(TieBreak v) { return v == TieBreak::high ? "high" : "low"; }

void RouterConfig::validate() const {
  MOE_REQUIRE(n_experts >= 1, "n_experts: must be at least 1, got ", n_experts);
  MOE_REQUIRE(d_model >= 1, "d_model: must be at least 1, got ", d_model);
  MOE_REQUIRE(k >= 1 && k <= n_experts, "k: must be in 1..", n_experts, " (n_experts), got ", k);
  MOE_REQUIRE(n_experts <= std::numeric_limits<int32_t>::max(), "n_experts: too large, got ",
              n_experts);
  MOE_REQUIRE(std::isfinite(noise_stddev) && noise_stddev >= 0.0f,
              "noise_stddev: must be finite and >= 0, got ", noise_stddev);
}

std::vector<float> RouterState::dense_gates() const {
  std::vector<float> g(static_cast<size_t>(T * E), 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) g[t * E + indices[t * k + j]] = weights[t * k + j];
  return g;
}

float philox_normal(uint64_t seed, uint64_t step, int64_t token, int64_t expert) {
  float z[4];
  detail::philox_normal4(z, seed, step, token, expert / 4);
  return z[expert % 4];
}

namespace {

void check_inputs(const RouterParams& p, const RouterConfig& cfg, int64_t T, bool training,
                  const NoiseSource& noise) {
  cfg.validate();
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(p.W_g != nullptr, "W_g: missing");
  MOE_REQUIRE(!cfg.use_bias || p.b_g != nullptr, "b_g: missing (use_bias is set)");
  MOE_REQUIRE(!(training && cfg.noise == Noise::learned) || p.W_noise != nullptr,
              "W_noise: missing (learned noise)");
  (void)noise;
}

void resize_state(RouterState& s, const RouterConfig& cfg, int64_t T, bool noisy) {
  const size_t TE = static_cast<size_t>(T * cfg.n_experts);
  s.T = T;
  s.E = cfg.n_experts;
  s.k = cfg.k;
  s.indices.resize(static_cast<size_t>(T * cfg.k));
  s.weights.resize(static_cast<size_t>(T * cfg.k));
  s.logits.resize(TE);
  s.noisy.resize(TE);
  s.probs.resize(TE);
  s.eps.resize(noisy ? TE : 0);
  s.noise_pre.resize(noisy && cfg.noise == Noise::learned ? TE : 0);
}

[[noreturn]] void throw_non_finite(const char* what, int64_t token) {
  throw Error(cat(what, ": non-finite value at token ", token));
}

// Noise, validation, selection and softmax for token t of a state whose logits (and
// noise_pre) are filled. Returns 0 when fine, 1 if h is bad, 2 if H is bad.
int finish_row(RouterState& s, const RouterConfig& cfg, int64_t t, bool noisy,
               const NoiseSource& noise, bool partial) {
  const int64_t E = s.E, k = s.k;
  const float* h = &s.logits[t * E];
  float* H = &s.noisy[t * E];
  if (!detail::all_finite(h, E)) return 1;
  if (noisy) {
    float* eps = &s.eps[t * E];
    if (noise.eps)
      std::copy(noise.eps + t * E, noise.eps + (t + 1) * E, eps);
    else
      detail::philox_normal_row(eps, E, noise.seed, noise.step, noise.token_offset + t);
    detail::noisy_row(H, h, eps, s.noise_pre.empty() ? nullptr : &s.noise_pre[t * E], E, cfg);
    if (!detail::all_finite(H, E)) return 2;
  } else {
    std::copy(h, h + E, H);
  }
  int32_t* idx = &s.indices[t * k];
  float* w = &s.weights[t * k];
  const bool high = cfg.tie_break == TieBreak::high;
  if (partial && k <= 16) {
    detail::select_topk_partial(idx, w, H, E, k, high);
  } else {
    // Reference selection: a full sort of the expert indices by rank.
    thread_local std::vector<int32_t> order;
    order.resize(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return detail::outranks(H[a], a, H[b], b, high);
    });
    for (int64_t j = 0; j < k; ++j) {
      idx[j] = order[j];
      w[j] = H[order[j]];
    }
  }
  detail::softmax_kept(w, w, k);
  detail::softmax_row(&s.probs[t * E], H, E);
  return 0;
}

void check_x_finite(const float* x, int64_t T, int64_t d) {
  int64_t bad = T;
#pragma omp parallel for reduction(min : bad) schedule(static)
  for (int64_t t = 0; t < T; ++t)
    if (t < bad && !detail::all_finite(x + t * d, d)) bad = t;
  if (bad < T) throw Error(cat("x: non-finite value at token ", bad));
}

void report_row_errors(const std::vector<int>& codes, const NoiseSource& noise) {
  for (size_t t = 0; t < codes.size(); ++t) {
    if (codes[t] == 1) throw_non_finite("router logits h", noise.token_offset + int64_t(t));
    if (codes[t] == 2) throw_non_finite("noisy logits H", noise.token_offset + int64_t(t));
  }
}

}  // namespace

void router_forward_ref(RouterState& s, const float* x, const RouterParams& p,
                        const RouterConfig& cfg, int64_t T, bool training,
                        const NoiseSource& noise) {
  check_inputs(p, cfg, T, training, noise);
  const int64_t d = cfg.d_model, E = cfg.n_experts;
  const bool noisy = training && cfg.noise != Noise::none;
  resize_state(s, cfg, T, noisy);
  s.training = training;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * d;
    if (!detail::all_finite(xt, d)) throw Error(cat("x: non-finite value at token ", t));
    for (int64_t e = 0; e < E; ++e) {
      float acc = cfg.use_bias ? p.b_g[e] : 0.0f;
      for (int64_t i = 0; i < d; ++i) acc += xt[i] * p.W_g[i * E + e];
      s.logits[t * E + e] = acc;
      if (!s.noise_pre.empty()) {
        float an = 0.0f;
        for (int64_t i = 0; i < d; ++i) an += xt[i] * p.W_noise[i * E + e];
        s.noise_pre[t * E + e] = an;
      }
    }
    const int code = finish_row(s, cfg, t, noisy, noise, /*partial=*/false);
    if (code == 1) throw_non_finite("router logits h", noise.token_offset + t);
    if (code == 2) throw_non_finite("noisy logits H", noise.token_offset + t);
  }
}

void router_forward(RouterState& s, const float* x, const RouterParams& p,
                    const RouterConfig& cfg, int64_t T, bool training,
                    const NoiseSource& noise) {
  check_inputs(p, cfg, T, training, noise);
  const int64_t d = cfg.d_model, E = cfg.n_experts;
  const bool noisy = training && cfg.noise != Noise::none;
  resize_state(s, cfg, T, noisy);
  s.training = training;
  if (T == 0) return;
  check_x_finite(x, T, d);

  if (s.noise_pre.empty()) {
    detail::gemm_f32(false, false, T, E, d, 1.0f, x, d, p.W_g, E, 0.0f, s.logits.data(), E);
  } else {
    // One GEMM against [W_g | W_noise] (d, 2E), then split the (T, 2E) product.
    thread_local std::vector<float> wcat, prod;
    wcat.resize(static_cast<size_t>(d * 2 * E));
    prod.resize(static_cast<size_t>(T * 2 * E));
    for (int64_t i = 0; i < d; ++i) {
      std::copy(p.W_g + i * E, p.W_g + (i + 1) * E, &wcat[i * 2 * E]);
      std::copy(p.W_noise + i * E, p.W_noise + (i + 1) * E, &wcat[i * 2 * E + E]);
    }
    detail::gemm_f32(false, false, T, 2 * E, d, 1.0f, x, d, wcat.data(), 2 * E, 0.0f,
                     prod.data(), 2 * E);
    const float* pr = prod.data();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      std::copy(pr + t * 2 * E, pr + t * 2 * E + E, &s.logits[t * E]);
      std::copy(pr + t * 2 * E + E, pr + (t + 1) * 2 * E, &s.noise_pre[t * E]);
    }
  }
  thread_local std::vector<int> codes;
  codes.assign(static_cast<size_t>(T), 0);
  int* code = codes.data();  // thread_local storage is the calling thread's: share by pointer
  int any_bad = 0;
#pragma omp parallel for schedule(static) reduction(| : any_bad)
  for (int64_t t = 0; t < T; ++t) {
    if (cfg.use_bias)
      for (int64_t e = 0; e < E; ++e) s.logits[t * E + e] += p.b_g[e];
    code[t] = finish_row(s, cfg, t, noisy, noise, /*partial=*/true);
    any_bad |= code[t];
  }
  if (any_bad) report_row_errors(codes, noise);
}

void router_backward(float* dx, RouterGrads& g, const float* dweights, const float* dprobs,
                     const float* dlogits, const RouterState& s, const float* x,
                     const RouterParams& p, const RouterConfig& cfg) {
  const int64_t T = s.T, E = s.E, k = s.k, d = cfg.d_model;
  MOE_REQUIRE(s.E == cfg.n_experts && s.k == cfg.k, "router_backward: state does not match config");
  const bool learned = !s.noise_pre.empty();
  const int64_t W = learned ? 2 * E : E;  // columns of [dh | d(noise_pre)]
  thread_local std::vector<float> dcat;
  dcat.assign(static_cast<size_t>(T * W), 0.0f);
  float* dc = dcat.data();  // thread_local storage is the calling thread's: share by pointer

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* dH = dc + t * W;  // dH accumulates here, then becomes dh in place
    const int32_t* idx = &s.indices[t * k];
    const float* w = &s.weights[t * k];
    if (dweights) {
      const float* dw = dweights + t * k;
      float dot = 0.0f;
      for (int64_t j = 0; j < k; ++j) dot += w[j] * dw[j];
      for (int64_t j = 0; j < k; ++j) dH[idx[j]] += w[j] * (dw[j] - dot);
    }
    if (dprobs) {
      const float* pr = &s.probs[t * E];
      const float* dp = dprobs + t * E;
      float dot = 0.0f;
      for (int64_t e = 0; e < E; ++e) dot += pr[e] * dp[e];
      for (int64_t e = 0; e < E; ++e) dH[e] += pr[e] * (dp[e] - dot);
    }
    if (learned) {
      const float* eps = &s.eps[t * E];
      const float* pre = &s.noise_pre[t * E];
      float* dpre = dH + E;
      for (int64_t e = 0; e < E; ++e) {
        const float ds = cfg.noise_scale == NoiseScale::softplus ? detail::sigmoid(pre[e]) : 1.0f;
        dpre[e] = dH[e] * eps[e] * ds;
      }
    }
    if (dlogits)
      for (int64_t e = 0; e < E; ++e) dH[e] += dlogits[t * E + e];
  }
  if (T == 0) return;

  // dx = [dh | dpre] · [W_g | W_noise]ᵀ as one GEMM against the concatenated weights.
  thread_local std::vector<float> wcat, dwcat;
  const float* Wc = p.W_g;
  if (learned) {
    wcat.resize(static_cast<size_t>(d * W));
    for (int64_t i = 0; i < d; ++i) {
      std::copy(p.W_g + i * E, p.W_g + (i + 1) * E, &wcat[i * W]);
      std::copy(p.W_noise + i * E, p.W_noise + (i + 1) * E, &wcat[i * W + E]);
    }
    Wc = wcat.data();
  }
  if (dx) detail::gemm_f32(false, true, T, d, W, 1.0f, dcat.data(), W, Wc, W, 0.0f, dx, d);
  dwcat.resize(static_cast<size_t>(d * W));
  detail::gemm_f32(true, false, d, W, T, 1.0f, x, d, dcat.data(), W, 0.0f, dwcat.data(), W);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t e = 0; e < E; ++e) {
      g.dW_g[i * E + e] += dwcat[i * W + e];
      if (learned && g.dW_noise) g.dW_noise[i * E + e] += dwcat[i * W + E + e];
    }
  if (cfg.use_bias && g.db_g)
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.0f;
      for (int64_t t = 0; t < T; ++t) acc += dcat[t * W + e];
      g.db_g[e] += acc;
    }
}

std::vector<float> noisy_top_k_gating(const float* logits, int64_t T, int64_t E, int64_t k,
                                      float noise_stddev, bool training, uint64_t seed) {
  RouterConfig cfg;
  cfg.d_model = 1;
  cfg.n_experts = E;
  cfg.k = k;
  cfg.noise = Noise::fixed;
  cfg.noise_stddev = noise_stddev;
  cfg.validate();
  MOE_REQUIRE(T >= 0, "logits: T must be >= 0, got ", T);
  RouterState s;
  const bool noisy = training && noise_stddev > 0.0f;
  resize_state(s, cfg, T, noisy);
  std::copy(logits, logits + T * E, s.logits.begin());
  NoiseSource ns;
  ns.seed = seed;
  for (int64_t t = 0; t < T; ++t) {
    const int code = finish_row(s, cfg, t, noisy, ns, /*partial=*/true);
    if (code == 1) throw_non_finite("logits", t);
    if (code == 2) throw_non_finite("noisy logits", t);
  }
  return s.dense_gates();
}

}  // namespace moe
