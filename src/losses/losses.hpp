// The auxiliary losses of SPEC §2 on any scalar type, shared by the public float functions,
// the fast layer and the reference twin. Sums run in double in a fixed order, whatever S is.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moe::detail {

// L_bal = α·E·Σ_i f_i·P_i with f_i the share of hard top-k selections (÷k when
// normalize_by_k) and P_i the mean of probs (T, E). The gradient flows through P only:
// ∂L/∂probs[t,i] = α·E·f_i / T, assigned to dprobs (T, E) when non-null.
template <typename S>
double load_balancing_loss_t(S* dprobs, const int32_t* indices, const S* probs, int64_t T,
                             int64_t k, int64_t E, double alpha, bool normalize_by_k) {
  if (T <= 0) return 0.0;
  thread_local std::vector<double> f, P;
  f.assign(static_cast<size_t>(E), 0.0);
  P.assign(static_cast<size_t>(E), 0.0);
  for (int64_t a = 0; a < T * k; ++a) f[indices[a]] += 1.0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) P[e] += static_cast<double>(probs[t * E + e]);
  const double fscale = 1.0 / (static_cast<double>(T) * (normalize_by_k ? double(k) : 1.0));
  double L = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    f[e] *= fscale;
    L += f[e] * (P[e] / static_cast<double>(T));
  }
  L *= alpha * static_cast<double>(E);
  if (dprobs) {
    const double c = alpha * static_cast<double>(E) / static_cast<double>(T);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) dprobs[t * E + e] = static_cast<S>(c * f[e]);
  }
  return L;
}

// L_z = c_z·(1/T)·Σ_t lse(h_t)², lse the log-sum-exp of a row of logits (T, E).
// ∂L/∂h[t,i] = (2·c_z/T)·lse(h_t)·softmax(h_t)_i, assigned to dlogits when non-null.
template <typename S>
double router_z_loss_t(S* dlogits, const S* logits, int64_t T, int64_t E, double c_z) {
  if (T <= 0) return 0.0;
  double L = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const S* h = logits + t * E;
    double mx = static_cast<double>(h[0]);
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, static_cast<double>(h[e]));
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(h[e]) - mx);
    const double lse = mx + std::log(sum);
    L += lse * lse;
    if (dlogits) {
      const double c = 2.0 * c_z / static_cast<double>(T) * lse / sum;
      for (int64_t e = 0; e < E; ++e)
        dlogits[t * E + e] = static_cast<S>(c * std::exp(static_cast<double>(h[e]) - mx));
    }
  }
  return c_z * L / static_cast<double>(T);
}

}  // namespace moe::detail
