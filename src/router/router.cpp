#include "moe/router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/cpu.hpp"
#include "common/gemm.hpp"
#include "common/philox.hpp"
#include "common/vec_math.hpp"
#include "moe/tensor.hpp"
#include "router/router_ref.hpp"
#include "router/router_rows.hpp"
#include "router/scores.hpp"
#include "router/row_kernels.hpp"

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
  if (s == "torch") return TieBreak::torch;
  throw Error(cat("tie_break: unknown value '", s, "' (expected high, low or torch)"));
}
const char* to_string(Noise v) {
  return v == Noise::none ? "none" : v == Noise::fixed ? "fixed" : "learned";
}
const char* to_string(NoiseScale v) { return v == NoiseScale::softplus ? "softplus" : "linear"; }
const char* to_string(TieBreak v) {
  return v == TieBreak::high ? "high" : v == TieBreak::low ? "low" : "torch";
}
GroupScore parse_group_score(const std::string& s) {
  if (s == "top2_sum") return GroupScore::top2_sum;
  if (s == "max") return GroupScore::max;
  throw Error(cat("group_score: unknown value '", s, "' (expected top2_sum or max)"));
}
const char* to_string(GroupScore v) { return v == GroupScore::top2_sum ? "top2_sum" : "max"; }

void RouterConfig::validate() const {
  detail::check_cpu_settings();  // MOE_MAX_ISA, MOE_AMX_MIN_ROWS
  MOE_REQUIRE(n_experts >= 1, "n_experts: must be at least 1, got ", n_experts);
  MOE_REQUIRE(d_model >= 1, "d_model: must be at least 1, got ", d_model);
  MOE_REQUIRE(k >= 1 && k <= n_experts, "k: must be in 1..", n_experts, " (n_experts), got ", k);
  MOE_REQUIRE(n_experts <= std::numeric_limits<int32_t>::max(), "n_experts: too large, got ",
              n_experts);
  MOE_REQUIRE(std::isfinite(noise_stddev) && noise_stddev >= 0.0f,
              "noise_stddev: must be finite and >= 0, got ", noise_stddev);
  MOE_REQUIRE(std::isfinite(scaling_factor) && scaling_factor > 0.0f,
              "scaling_factor: must be finite and > 0, got ", scaling_factor);
  MOE_REQUIRE(n_groups >= 1 && n_groups <= n_experts && n_experts % n_groups == 0,
              "n_groups: must divide n_experts (", n_experts, "), got ", n_groups);
  MOE_REQUIRE(topk_groups >= 1 && topk_groups <= n_groups, "topk_groups: must be in 1..",
              n_groups, " (n_groups), got ", topk_groups);
  MOE_REQUIRE(n_groups == 1 || k <= topk_groups * (n_experts / n_groups),
              "k: must be at most topk_groups * experts per group (",
              topk_groups * (n_experts / n_groups), "), got ", k);
  MOE_REQUIRE(std::isfinite(jitter) && jitter >= 0.0f && jitter < 1.0f,
              "jitter: must be in [0, 1), got ", jitter);
}

std::vector<float> RouterState::dense_gates() const {
  std::vector<float> g(static_cast<size_t>(T * E), 0.0f);
  const int64_t C = ec_capacity;
  if (C > 0 && ec_tokens.size() == static_cast<size_t>(E * C)) {  // expert choice
    for (int64_t r = 0; r < E * C; ++r) g[ec_tokens[r] * E + r / C] = ec_gates[r];
    return g;
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) g[t * E + indices[t * k + j]] = weights[t * k + j];
  return g;
}

float philox_normal(uint64_t seed, uint64_t step, int64_t token, int64_t expert) {
  MOE_REQUIRE(token >= 0, "token: must be >= 0, got ", token);
  MOE_REQUIRE(expert >= 0, "expert: must be >= 0, got ", expert);
  float z[4];
  detail::philox_normal4(z, seed, step, token, expert / 4);
  return z[expert % 4];
}

namespace detail {

void check_router_call(const RouterConfig& cfg, int64_t T, bool training, const void* x,
                       const void* W_g, const void* b_g, const void* W_noise,
                       const NoiseSource& noise) {
  cfg.validate();
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(T == 0 || x != nullptr, "x: missing (T = ", T, ")");
  MOE_REQUIRE(W_g != nullptr, "W_g: missing");
  MOE_REQUIRE(!cfg.use_bias || b_g != nullptr, "b_g: missing (use_bias is set)");
  MOE_REQUIRE(!(training && cfg.noise == Noise::learned) || W_noise != nullptr,
              "W_noise: missing (learned noise in training)");
  MOE_REQUIRE(noise.token_offset >= 0, "token_offset: must be >= 0, got ", noise.token_offset);
}

void throw_non_finite(const char* what, int64_t t, const NoiseSource& noise) {
  if (noise.token_offset == 0) throw Error(cat(what, ": non-finite value at token ", t));
  throw Error(cat(what, ": non-finite value at token ", noise.token_offset + t, " (row ", t,
                  " of this batch, token_offset ", noise.token_offset, ")"));
}

void router_state_resize(RouterState& s, const RouterConfig& cfg, int64_t T, bool noisy) {
  const size_t TE = static_cast<size_t>(T * cfg.n_experts);
  s.T = T;
  s.E = cfg.n_experts;
  s.k = cfg.k;
  s.indices.resize(static_cast<size_t>(T * cfg.k));
  s.weights.resize(static_cast<size_t>(T * cfg.k));
  s.logits.resize(TE);
  s.noisy.resize(noisy ? TE : 0);
  s.probs.resize(TE);
  s.eps.resize(noisy ? TE : 0);
  s.noise_pre.resize(noisy && cfg.noise == Noise::learned ? TE : 0);
  s.scores.resize(cfg.kind == RouterKind::sigmoid ? TE : 0);
}

namespace {

constexpr int64_t kChunk = 16;  // tokens per OpenMP work item (ε is drawn per chunk)

enum RowCode : int { kRowBadH = 1, kRowBadEps = 2, kRowBadNoisy = 3 };

// 1 for ±inf and NaN (v - v is NaN), else 0: an int so that |= over a row vectorises.
inline int non_finite_f32(float v) { return !(v - v == 0.0f); }
inline bool all_finite_f32(const float* v, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= non_finite_f32(v[i]);
  return bad == 0;
}

}  // namespace

namespace {

inline void scale_weights(float* w, int64_t k, const RouterConfig& cfg) {
  if (cfg.scaling_factor != 1.0f)
    for (int64_t j = 0; j < k; ++j) w[j] *= cfg.scaling_factor;
}

// Token t's h (with bias) into its logits row, rounded to bf16 where cfg.round_logits.
void copy_logits_row(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                     int64_t t) {
  const int64_t E = s.E;
  float* h = &s.logits[t * E];
  const float* hsrc = in.h + t * in.ldh;
  if (in.b_g) {
    for (int64_t e = 0; e < E; ++e) h[e] = hsrc[e] + in.b_g[e];
  } else if (h != hsrc) {
    std::copy(hsrc, hsrc + E, h);
  }
  if (cfg.round_logits)
    for (int64_t e = 0; e < E; ++e) h[e] = round_bf16(h[e]);
}

// The first token of [t0, t1) whose h, ε or H is not finite, as 4·t + code, in that order of
// blame (a bad h or ε makes H bad too); -1 if none.
int64_t first_bad_noisy_token(const RouterState& s, int64_t t0, int64_t t1) {
  const int64_t E = s.E;
  for (int64_t t = t0; t < t1; ++t) {
    if (!all_finite_f32(&s.logits[t * E], E)) return 4 * t + kRowBadH;
    if (!all_finite_f32(&s.eps[t * E], E)) return 4 * t + kRowBadEps;
    if (!all_finite_f32(&s.noisy[t * E], E)) return 4 * t + kRowBadNoisy;
  }
  return -1;
}

// Tokens [t0, t1) before the selection: h (with bias) → logits and, with noise, ε and the noise
// scale's input into the state's rows. Those rows lie back to back (stride E), so H = h +
// scale·ε runs over one row of n·E values, with no half-empty vectors for small E. Without
// noise H is h itself, and the plain router leaves h's check to the selection, which reads it.
// Returns the first bad token's 4·t + code, or -1.
int64_t prepare_chunk_f32(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                          bool noisy, bool plain, const NoiseSource& noise, int64_t t0,
                          int64_t t1) {
  const int64_t E = s.E, n = (t1 - t0) * E;
  for (int64_t t = t0; t < t1; ++t) {
    copy_logits_row(s, in, cfg, t);
    if (!noisy) continue;
    if (noise.eps) std::copy(noise.eps + t * E, noise.eps + (t + 1) * E, &s.eps[t * E]);
    if (in.pre) std::copy(in.pre + t * in.ldpre, in.pre + t * in.ldpre + E, &s.noise_pre[t * E]);
  }
  if (!noisy) {
    if (!plain)
      for (int64_t t = t0; t < t1; ++t)
        if (!all_finite_f32(&s.logits[t * E], E)) return 4 * t + kRowBadH;
    return -1;
  }
  float* H = &s.noisy[t0 * E];
  const float* h = &s.logits[t0 * E];
  const float* eps = &s.eps[t0 * E];
  const float* pre = in.pre ? &s.noise_pre[t0 * E] : nullptr;
  const bool ok = !pre ? noisy_row_f32<0>(H, h, eps, nullptr, cfg.noise_stddev, n)
                  : cfg.noise_scale == NoiseScale::softplus
                      ? noisy_row_f32<1>(H, h, eps, pre, 0.0f, n)
                      : noisy_row_f32<2>(H, h, eps, pre, 0.0f, n);
  // A non-finite H is also what a non-finite h or ε gives (inf − inf, 0·inf, NaN: all NaN).
  return ok ? -1 : first_bad_noisy_token(s, t0, t1);
}

// One token after the plain router's selection (idx, and the kept values in w): the kept
// softmax and probs.
void finish_token_f32(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                      int64_t t) {
  const int64_t E = s.E, k = s.k;
  const int32_t* idx = &s.indices[t * k];
  float* w = &s.weights[t * k];
  if (!in.probs) {  // the kept softmax alone (benchmarks of the select+softmax part)
    scale_weights(w, k, cfg);
    return;
  }
  // The kept softmax reuses probs' exponentials: H[idx[0]] is the row max, so e^{H - max}
  // at the kept experts are exactly the kept softmax's numerators.
  float* pr = &s.probs[t * E];
  const float all = exp_row_f32(pr, s.H() + t * E, w[0], E);
  float kept = 0.0f;
  for (int64_t j = 0; j < k; ++j) kept += (w[j] = pr[idx[j]]);
  const float inv_kept = 1.0f / kept, inv_all = 1.0f / all;
  for (int64_t j = 0; j < k; ++j) w[j] *= inv_kept;
  for (int64_t e = 0; e < E; ++e) pr[e] *= inv_all;
  scale_weights(w, k, cfg);
}

// Tokens [t0, t1): prepare, select (the plain router, all rows at once), finish. Returns the
// first bad token's 4·t + code, or -1.
int64_t route_chunk_f32(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                        bool noisy, const NoiseSource& noise, int64_t t0, int64_t t1) {
  const int64_t E = s.E, k = s.k, n = t1 - t0;
  const bool plain = router_scores_default(cfg, in.sel_bias);  // else the family (scores.hpp)
  if (const int64_t bad = prepare_chunk_f32(s, in, cfg, noisy, plain, noise, t0, t1); bad >= 0)
    return bad;
  if (!plain) {
    for (int64_t t = t0; t < t1; ++t)
      route_scores_row_f32(&s.indices[t * k], &s.weights[t * k], &s.probs[t * E],
                           s.scores.empty() ? nullptr : &s.scores[t * E], s.H() + t * E,
                           in.sel_bias, cfg);
    return -1;
  }
  const bool high = cfg.tie_break == TieBreak::high;
  int32_t* idx = &s.indices[t0 * k];
  float* val = &s.weights[t0 * k];
  if (noisy) {
    topk_rows_f32(idx, val, &s.noisy[t0 * E], E, n, E, k, high);
  } else {
    // H = h: one pass checks h and starts the selection.
    const int64_t bad = check_topk_rows_f32(idx, val, &s.logits[t0 * E], E, n, E, k, high);
    if (bad >= 0) return 4 * (t0 + bad) + kRowBadH;
  }
  if (!in.probs) softmax_kept_rows_f32(val, n, k);
  for (int64_t t = t0; t < t1; ++t) finish_token_f32(s, in, cfg, t);
  return -1;
}

}  // namespace

void router_rows_f32(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                     bool noisy, const NoiseSource& noise) {
  const int64_t T = s.T, E = s.E;
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  int64_t first_bad = kNone;  // 4·t + code of the first bad token
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t0 = c * kChunk, t1 = std::min(T, t0 + kChunk);
    if (noisy && !noise.eps)
      philox_normal_rows(&s.eps[t0 * E], E, t1 - t0, E, noise.seed, noise.step,
                         noise.token_offset + t0);
    const int64_t bad = route_chunk_f32(s, in, cfg, noisy, noise, t0, t1);
    if (bad >= 0) first_bad = std::min(first_bad, bad);
  }
  if (first_bad == kNone) return;
  const int64_t t = first_bad / 4;
  switch (first_bad % 4) {
    case kRowBadH:
      if (in.x) {
        const float* xt = in.x + t * in.d;
        if (!std::all_of(xt, xt + in.d, [](float v) { return std::isfinite(v); }))
          throw_non_finite("x", t, noise);
      }
      throw_non_finite(in.h_name, t, noise);
    case kRowBadEps:
      throw_non_finite("noise eps", t, noise);
    default:
      throw_non_finite("noisy logits H", t, noise);
  }
}

}  // namespace detail

void router_forward_ref(RouterState& s, const float* x, const RouterParams& p,
                        const RouterConfig& cfg, int64_t T, bool training,
                        const NoiseSource& noise) {
  detail::RouterRefOut<float> o;
  detail::router_forward_ref_t<float>(o, x, {p.W_g, p.b_g, p.W_noise, p.sel_bias}, cfg, T,
                                      training, noise);
  detail::router_state_resize(s, cfg, T, training && cfg.noise != Noise::none);
  s.training = training;
  s.indices = std::move(o.indices);
  s.weights = std::move(o.weights);
  s.logits = std::move(o.logits);
  s.noisy = training && cfg.noise != Noise::none ? std::move(o.noisy) : std::vector<float>{};
  s.probs = std::move(o.probs);
  s.eps = std::move(o.eps);
  s.noise_pre = std::move(o.noise_pre);
  s.scores = std::move(o.scores);
  s.jitter = std::move(o.jitter);
}

void router_forward(RouterState& s, const float* x, const RouterParams& p,
                    const RouterConfig& cfg, int64_t T, bool training,
                    const NoiseSource& noise) {
  detail::check_router_call(cfg, T, training, x, p.W_g, p.b_g, p.W_noise, noise);
  const int64_t d = cfg.d_model, E = cfg.n_experts;
  const bool noisy = training && cfg.noise != Noise::none;
  const bool jit = training && cfg.jitter > 0.0f;
  detail::router_state_resize(s, cfg, T, noisy);
  s.jitter.resize(jit ? static_cast<size_t>(T * d) : 0);
  s.training = training;
  if (T == 0) return;

  detail::RouterRowsInput in;
  in.b_g = cfg.use_bias ? p.b_g : nullptr;
  in.sel_bias = p.sel_bias;
  in.x = x;
  in.d = d;
  const bool learned = !s.noise_pre.empty();
  const int64_t N = learned ? 2 * E : E;
  // Scratch: [W_g | W_noise] (d, 2E) and the (T, 2E) product, then the jittered input (T, d).
  const int64_t n_cat = learned ? (d + T) * N : 0;
  s.work.resize(static_cast<size_t>(n_cat + (jit ? T * d : 0)));
  if (jit) {
    // The router alone sees x·u, u ~ U(1 - jitter, 1 + jitter) per element (Switch).
    float* xj = s.work.data() + n_cat;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* u = &s.jitter[t * d];
      detail::jitter_row(u, d, cfg.jitter, noise.seed, noise.step, noise.token_offset + t);
      for (int64_t i = 0; i < d; ++i) xj[t * d + i] = x[t * d + i] * u[i];
    }
    x = xj;
  }
  if (!learned) {
    detail::gemm_f32_rows(s.logits.data(), E, x, p.W_g, T, d, E);
    in.h = s.logits.data();
    in.ldh = E;
  } else {
    // One GEMM against [W_g | W_noise] (d, 2E); the rows read h and x·W_noise straight out
    // of the (T, 2E) product.
    float* wcat = s.work.data();
    float* prod = wcat + d * N;
    for (int64_t i = 0; i < d; ++i) {
      std::copy(p.W_g + i * E, p.W_g + (i + 1) * E, wcat + i * N);
      std::copy(p.W_noise + i * E, p.W_noise + (i + 1) * E, wcat + i * N + E);
    }
    detail::gemm_f32_rows(prod, N, x, wcat, T, d, N);
    in.h = prod;
    in.ldh = 2 * E;
    in.pre = prod + E;
    in.ldpre = 2 * E;
  }
  detail::router_rows_f32(s, in, cfg, noisy, noise);
}

void router_backward(float* dx, RouterGrads& g, const float* dweights, const float* dprobs,
                     const float* dlogits, const RouterState& s, const float* x,
                     const RouterParams& p, const RouterConfig& cfg) {
  const int64_t T = s.T, E = s.E, k = s.k, d = cfg.d_model;
  MOE_REQUIRE(s.E == cfg.n_experts && s.k == cfg.k,
              "router_backward: state (E = ", s.E, ", k = ", s.k, ") does not match config (E = ",
              cfg.n_experts, ", k = ", cfg.k, ")");
  MOE_REQUIRE(s.indices.size() == static_cast<size_t>(T * k) &&
                  s.probs.size() == static_cast<size_t>(T * E),
              "router_backward: state is not the output of a forward");
  MOE_REQUIRE(T == 0 || x != nullptr, "x: missing");
  MOE_REQUIRE(p.W_g != nullptr, "W_g: missing");
  const bool learned = !s.noise_pre.empty();
  MOE_REQUIRE(!learned || p.W_noise != nullptr, "W_noise: missing (learned noise)");
  const bool jit = !s.jitter.empty();
  MOE_REQUIRE(!jit || s.jitter.size() == static_cast<size_t>(T * d),
              "router_backward: state's jitter does not match d_model");
  MOE_REQUIRE(cfg.kind != RouterKind::sigmoid || s.scores.size() == static_cast<size_t>(T * E),
              "router_backward: state is not the output of a sigmoid router's forward");
  if (T == 0) return;
  const int64_t W = learned ? 2 * E : E;  // columns of [dh | d(x·W_noise)]
  // The default router with scaling 1 keeps its own loop below (bit-identical results).
  const bool family = !detail::kept_softmax_kind(cfg.kind) || cfg.scaling_factor != 1.0f;

  // Scratch: dcat (T, W), then [W_g | W_noise] (d, W) and its gradient (d, W) when learned,
  // then the jittered input x·u (T, d).
  const int64_t n_w = learned ? 2 * d * W : d * W;
  s.work.resize(static_cast<size_t>(T * W + n_w + (jit ? T * d : 0)));
  float* dc = s.work.data();
  float* wcat = dc + T * W;
  float* dwcat = learned ? wcat + d * W : wcat;
  std::fill(dc, dc + T * W, 0.0f);
  if (jit) {
    // The router's input was x·u: its weight gradients see x·u, and dx gets a factor u.
    float* xj = wcat + n_w;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) xj[t * d + i] = x[t * d + i] * s.jitter[t * d + i];
    x = xj;
  }

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* dH = dc + t * W;  // dH accumulates here, then becomes dh in place
    const int32_t* idx = &s.indices[t * k];
    const float* w = &s.weights[t * k];
    if (family) {
      thread_local std::vector<float> scratch;
      scratch.resize(static_cast<size_t>(E));
      detail::scores_backward_row<float>(dH, scratch.data(), dweights ? dweights + t * k : nullptr,
                                         dprobs ? dprobs + t * E : nullptr, idx, w,
                                         &s.probs[t * E],
                                         s.scores.empty() ? nullptr : &s.scores[t * E],
                                         s.H() + t * E, cfg);
    } else if (dweights) {
      const float* dw = dweights + t * k;
      float dot = 0.0f;
      for (int64_t j = 0; j < k; ++j) dot += w[j] * dw[j];
      for (int64_t j = 0; j < k; ++j) dH[idx[j]] += w[j] * (dw[j] - dot);
    }
    if (dprobs && !family) {
      const float* pr = &s.probs[t * E];
      const float* dp = dprobs + t * E;
      float dot = 0.0f;
      for (int64_t e = 0; e < E; ++e) dot += pr[e] * dp[e];
      for (int64_t e = 0; e < E; ++e) dH[e] += pr[e] * (dp[e] - dot);
    }
    if (learned) {
      // H = h + scale(pre)·ε: ∂H/∂pre = ε·scale'(pre), scale' = sigmoid for softplus.
      const float* eps = &s.eps[t * E];
      const float* pre = &s.noise_pre[t * E];
      float* dpre = dH + E;
      const bool sp = cfg.noise_scale == NoiseScale::softplus;
      for (int64_t e = 0; e < E; ++e) {
        const float z = pre[e];
        const float ds = sp ? (z >= 0.0f ? 1.0f / (1.0f + std::exp(-z))
                                         : std::exp(z) / (1.0f + std::exp(z)))
                            : 1.0f;
        dpre[e] = dH[e] * eps[e] * ds;
      }
    }
    // ∂H/∂h = 1; the extra ∂L/∂h (z-loss) joins after the noise term, which it does not feed.
    if (dlogits)
      for (int64_t e = 0; e < E; ++e) dH[e] += dlogits[t * E + e];
  }

  // dx = [dh | dpre] · [W_g | W_noise]ᵀ and d[W_g | W_noise] = xᵀ · [dh | dpre], one GEMM each.
  const float* Wc = p.W_g;
  if (learned) {
    for (int64_t i = 0; i < d; ++i) {
      std::copy(p.W_g + i * E, p.W_g + (i + 1) * E, wcat + i * W);
      std::copy(p.W_noise + i * E, p.W_noise + (i + 1) * E, wcat + i * W + E);
    }
    Wc = wcat;
  }
  if (dx) {
    detail::gemm_f32(false, true, T, d, W, 1.0f, dc, W, Wc, W, 0.0f, dx, d);
    if (jit)
      for (int64_t i = 0; i < T * d; ++i) dx[i] *= s.jitter[static_cast<size_t>(i)];
  }
  if (g.dW_g || (learned && g.dW_noise)) {
    detail::gemm_f32(true, false, d, W, T, 1.0f, x, d, dc, W, 0.0f, dwcat, W);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t e = 0; e < E; ++e) {
        if (g.dW_g) g.dW_g[i * E + e] += dwcat[i * W + e];
        if (learned && g.dW_noise) g.dW_noise[i * E + e] += dwcat[i * W + E + e];
      }
  }
  if (cfg.use_bias && g.db_g)
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.0f;
      for (int64_t t = 0; t < T; ++t) acc += dc[t * W + e];
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
  MOE_REQUIRE(T == 0 || logits != nullptr, "logits: missing");
  RouterState s;
  const bool noisy = training && noise_stddev > 0.0f;
  detail::router_state_resize(s, cfg, T, noisy);
  detail::RouterRowsInput in;
  in.h = logits;
  in.ldh = E;
  in.h_name = "logits";
  NoiseSource ns;
  ns.seed = seed;
  detail::router_rows_f32(s, in, cfg, noisy, ns);
  return s.dense_gates();
}

}  // namespace moe
