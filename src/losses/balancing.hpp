// The balancing losses of the router family (docs/routing.md, "Balancing losses ..."), on any
// scalar type, shared by the fast layer and its reference twin. Each is computed per layer,
// on the layer's own routing (never over layers concatenated). Sums run in double in a fixed
// order, whatever S is.
//
//   switch   SPEC §2: α·E·Σ_i f_i·P_i over the batch.
//   seq      the switch loss per sequence of seq_len consecutive tokens, averaged.
//   global   α·E·Σ_i f_i·P_i with f from the loads accumulated since the last reset (given
//            by the caller in `global_f`), P from the batch.
//   shazeer  α·CV(Importance)² + α·CV(Load)² (Shazeer et al. 2017), the load term only
//            when noise was applied.
//   none     0.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/row_math.hpp"
#include "losses/losses.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

// The routing a balancing loss reads. (T, E) arrays may be null when the kind does not read
// them: switch/seq/global read indices and probs; shazeer reads indices, weights, h, H, and,
// when noisy, eps and pre (learned noise only).
template <typename S>
struct BalanceInputs {
  int64_t T = 0, k = 0, E = 0;
  const int32_t* indices = nullptr;  // (T, k)
  const S* weights = nullptr;        // (T, k) gate weights of the kept experts
  const S* probs = nullptr;          // (T, E) softmax(H)
  const S* h = nullptr;              // (T, E) clean logits
  const S* H = nullptr;              // (T, E) noisy logits
  const S* eps = nullptr;            // (T, E) ε, when noisy
  const S* pre = nullptr;            // (T, E) x·W_noise, learned noise only
  bool noisy = false;                // noise was applied (training, noise != none)
  const double* global_f = nullptr;  // (E) f for kind global; null: the batch's own f
};

// Gradients, each optional. dprobs is assigned (zeros for the kinds that do not read probs);
// the others accumulate: dweights (T, k), dh (T, E) the clean logits, dpre (T, E) x·W_noise.
template <typename S>
struct BalanceGrads {
  S* dprobs = nullptr;
  S* dweights = nullptr;
  S* dh = nullptr;
  S* dpre = nullptr;
};

struct BalanceSpec {
  AuxLossKind kind = AuxLossKind::switch_lb;
  double alpha = 0.0;
  bool normalize_by_k = false;
  int64_t seq_len = 0;  // seq: tokens per sequence, 0: the whole batch
  Noise noise = Noise::none;
  NoiseScale noise_scale = NoiseScale::softplus;
  double noise_stddev = 0.0;  // σ of fixed noise

  static BalanceSpec of(const MoEConfig& c) {
    BalanceSpec s;
    s.kind = c.aux_loss_kind;
    s.alpha = c.aux_alpha;
    s.normalize_by_k = c.normalize_by_k;
    s.seq_len = c.seq_len;
    s.noise = c.noise;
    s.noise_scale = c.noise_scale;
    s.noise_stddev = c.noise_stddev;
    return s;
  }
};

// f_i of one batch: hard top-k selections per expert over T tokens, ÷k when normalize_by_k.
inline void selection_share(std::vector<double>& f, const int32_t* indices, int64_t T, int64_t k,
                            int64_t E, bool normalize_by_k) {
  f.assign(static_cast<size_t>(E), 0.0);
  for (int64_t a = 0; a < T * k; ++a) f[indices[a]] += 1.0;
  const double s = 1.0 / (static_cast<double>(T) * (normalize_by_k ? double(k) : 1.0));
  for (auto& v : f) v *= s;
}

// α·E·Σ_i f_i·P_i over tokens [t0, t0 + n) with P their mean probs; dprobs rows of those
// tokens assigned α·E·f_i/n · scale. Returns the loss times scale.
template <typename S>
double switch_loss_rows(S* dprobs, const double* f, const S* probs, int64_t t0, int64_t n,
                        int64_t E, double alpha, double scale) {
  std::vector<double> P(static_cast<size_t>(E), 0.0);
  for (int64_t t = t0; t < t0 + n; ++t)
    for (int64_t e = 0; e < E; ++e) P[e] += static_cast<double>(probs[t * E + e]);
  double L = 0.0;
  for (int64_t e = 0; e < E; ++e) L += f[e] * (P[e] / static_cast<double>(n));
  if (dprobs) {
    const double c = scale * alpha * static_cast<double>(E) / static_cast<double>(n);
    for (int64_t t = t0; t < t0 + n; ++t)
      for (int64_t e = 0; e < E; ++e) dprobs[t * E + e] = static_cast<S>(c * f[e]);
  }
  return scale * alpha * static_cast<double>(E) * L;
}

// CV(v)² = Var(v) / (mean(v)² + 1e-10), population variance (as tensor2tensor's
// cv_squared); dv (n) is assigned ∂CV²/∂v when non-null. 0 for n = 1.
inline double cv_squared(double* dv, const std::vector<double>& v) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (dv) std::fill(dv, dv + n, 0.0);
  if (n <= 1) return 0.0;
  double m = 0.0;
  for (double a : v) m += a;
  m /= static_cast<double>(n);
  double var = 0.0;
  for (double a : v) var += (a - m) * (a - m);
  var /= static_cast<double>(n);
  const double den = m * m + 1e-10;
  if (dv)
    for (int64_t i = 0; i < n; ++i)
      dv[i] = 2.0 * (v[i] - m) / static_cast<double>(n) / den -
              var * 2.0 * m / static_cast<double>(n) / (den * den);
  return var / den;
}

inline double normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }
inline double normal_pdf(double z) { return 0.3989422804014327 * std::exp(-0.5 * z * z); }

// Shazeer et al. 2017: α·CV(Importance)² + α·CV(Load)², Importance_i = Σ_t G_t,i and
// Load_i = Σ_t Φ((h_t,i − thr_t,i) / s_t,i), thr_t,i the k-th largest noisy logit among the
// other experts (the (k+1)-th of the row when i is in the top k, else the k-th), s_t,i the
// noise's standard deviation: softplus(pre), |pre| (linear scale) or σ (fixed). The load term
// is 0 without noise (evaluation, noise none) and when k = E (every expert always chosen).
// A zero s makes Φ a step (0, ½ or 1) with no gradient.
template <typename S>
double shazeer_loss(const BalanceGrads<S>& g, const BalanceInputs<S>& in, const BalanceSpec& sp) {
  const int64_t T = in.T, k = in.k, E = in.E;
  std::vector<double> imp(static_cast<size_t>(E), 0.0), dimp(static_cast<size_t>(E));
  for (int64_t a = 0; a < T * k; ++a) imp[in.indices[a]] += static_cast<double>(in.weights[a]);
  double L = sp.alpha * cv_squared(dimp.data(), imp);
  if (g.dweights)
    for (int64_t a = 0; a < T * k; ++a)
      g.dweights[a] += static_cast<S>(sp.alpha * dimp[in.indices[a]]);
  if (!in.noisy || k >= E) return L;

  // Per token: the sorted noisy row gives the k-th and (k+1)-th largest and who holds them.
  std::vector<double> load(static_cast<size_t>(E), 0.0), dload(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  auto row_order = [&](int64_t t) {
    const S* H = in.H + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
    // The top k are the router's choice (its tie-break); the rest by value, then index.
    std::vector<char> top(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < k; ++j) {
      order[j] = in.indices[t * k + j];
      top[in.indices[t * k + j]] = 1;
    }
    int64_t n = k;
    for (int64_t e = 0; e < E; ++e)
      if (!top[e]) order[n++] = static_cast<int32_t>(e);
    std::sort(order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return H[a] != H[b] ? H[a] > H[b] : a < b;
    });
  };
  auto stddev = [&](int64_t t, int64_t e, double* dsd_dpre) {
    *dsd_dpre = 0.0;
    if (sp.noise == Noise::fixed) return sp.noise_stddev;
    const double z = static_cast<double>(in.pre[t * E + e]);
    if (sp.noise_scale == NoiseScale::softplus) {
      *dsd_dpre = static_cast<double>(sigmoid(z));
      return static_cast<double>(softplus(z));
    }
    *dsd_dpre = z >= 0.0 ? 1.0 : -1.0;
    return std::abs(z);
  };
  // Forward: the loads.
  for (int64_t t = 0; t < T; ++t) {
    row_order(t);
    const S* H = in.H + t * E;
    std::vector<char> in_top(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < k; ++j) in_top[order[j]] = 1;
    for (int64_t e = 0; e < E; ++e) {
      const double thr = static_cast<double>(H[in_top[e] ? order[k] : order[k - 1]]);
      double dsd;
      const double s = stddev(t, e, &dsd);
      const double num = static_cast<double>(in.h[t * E + e]) - thr;
      load[e] += s > 0.0 ? normal_cdf(num / s) : (num > 0.0 ? 1.0 : num < 0.0 ? 0.0 : 0.5);
    }
  }
  L += sp.alpha * cv_squared(dload.data(), load);
  if (!g.dh && !g.dpre) return L;
  // Backward: ∂Φ(z)/∂· with z = (h_i − H_j)/s_i, H_j = h_j + scale_j·ε_j.
  for (int64_t t = 0; t < T; ++t) {
    row_order(t);
    const S* H = in.H + t * E;
    std::vector<char> in_top(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < k; ++j) in_top[order[j]] = 1;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t jt = in_top[e] ? order[k] : order[k - 1];
      double dsd;
      const double s = stddev(t, e, &dsd);
      if (!(s > 0.0)) continue;
      const double z = (static_cast<double>(in.h[t * E + e]) - static_cast<double>(H[jt])) / s;
      const double c = sp.alpha * dload[e] * normal_pdf(z);  // ∂L/∂z
      // z through h_i, through s_i, and through the threshold H_j.
      if (g.dh) {
        g.dh[t * E + e] += static_cast<S>(c / s);
        g.dh[t * E + jt] -= static_cast<S>(c / s);
      }
      if (g.dpre && sp.noise == Noise::learned) {
        g.dpre[t * E + e] += static_cast<S>(-c * z / s * dsd);
        // H_j = h_j + scale(pre_j)·ε_j; scale' is sigmoid (softplus) or 1 (linear).
        const double pj = static_cast<double>(in.pre[t * E + jt]);
        const double dscale = sp.noise_scale == NoiseScale::softplus
                                  ? static_cast<double>(sigmoid(pj))
                                  : 1.0;
        g.dpre[t * E + jt] -= static_cast<S>(c / s * static_cast<double>(in.eps[t * E + jt]) *
                                             dscale);
      }
    }
  }
  return L;
}

// The layer's balancing loss of kind sp.kind; see the top of this file.
template <typename S>
double balancing_loss(const BalanceGrads<S>& g, const BalanceInputs<S>& in,
                      const BalanceSpec& sp) {
  const int64_t T = in.T, k = in.k, E = in.E;
  if (g.dprobs) std::fill(g.dprobs, g.dprobs + T * E, S(0));
  if (T <= 0 || sp.alpha == 0.0 || sp.kind == AuxLossKind::none) return 0.0;
  std::vector<double> f;
  switch (sp.kind) {
    case AuxLossKind::none:
      return 0.0;
    case AuxLossKind::switch_lb:
      return load_balancing_loss_t<S>(g.dprobs, in.indices, in.probs, T, k, E, sp.alpha,
                                      sp.normalize_by_k);
    case AuxLossKind::global:
      if (!in.global_f)
        return load_balancing_loss_t<S>(g.dprobs, in.indices, in.probs, T, k, E, sp.alpha,
                                        sp.normalize_by_k);
      return switch_loss_rows<S>(g.dprobs, in.global_f, in.probs, 0, T, E, sp.alpha, 1.0);
    case AuxLossKind::seq: {
      const int64_t n = sp.seq_len > 0 ? sp.seq_len : T;
      const int64_t n_seq = T / n;  // the layer checked that n divides T
      double L = 0.0;
      for (int64_t q = 0; q < n_seq; ++q) {
        selection_share(f, in.indices + q * n * k, n, k, E, sp.normalize_by_k);
        L += switch_loss_rows<S>(g.dprobs, f.data(), in.probs, q * n, n, E, sp.alpha,
                                 1.0 / static_cast<double>(n_seq));
      }
      return L;
    }
    case AuxLossKind::shazeer:
      return shazeer_loss<S>(g, in, sp);
  }
  return 0.0;
}

}  // namespace moe::detail
