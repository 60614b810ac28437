// Per-token pieces of routing shared by the reference and the fast router.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/router.hpp"

namespace moe::detail {

// softplus(z) = max(z, 0) + log1p(exp(-|z|)): never overflows.
template <typename S>
inline S softplus(S z) {
  return std::max(z, S(0)) + std::log1p(std::exp(-std::abs(z)));
}
template <typename S>
inline S sigmoid(S z) {
  return z >= S(0) ? S(1) / (S(1) + std::exp(-z)) : std::exp(z) / (S(1) + std::exp(z));
}

// a outranks b: larger value, ties to the higher (or lower) expert index.
template <typename S>
inline bool outranks(S va, int32_t ia, S vb, int32_t ib, bool tie_high) {
  if (va != vb) return va > vb;
  return tie_high ? ia > ib : ia < ib;
}

// Partial selection, O(E·k): a sorted list of the k best so far; each candidate that beats
// the current k-th is inserted in place.
template <typename S>
inline void select_topk_partial(int32_t* idx, S* val, const S* row, int64_t E, int64_t k,
                                bool tie_high) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const S v = row[e];
    const int32_t ie = static_cast<int32_t>(e);
    if (n == k && !outranks(v, ie, val[k - 1], idx[k - 1], tie_high)) continue;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && outranks(v, ie, val[pos - 1], idx[pos - 1], tie_high)) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = ie;
  }
}

// Softmax over the kept values (val[0] is the largest), stable; w may alias val.
template <typename S>
inline void softmax_kept(S* w, const S* val, int64_t k) {
  const S top = val[0];
  S sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += (w[j] = std::exp(val[j] - top));
  for (int64_t j = 0; j < k; ++j) w[j] /= sum;
}

template <typename S>
inline void softmax_row(S* p, const S* row, int64_t E) {
  S mx = row[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, row[e]);
  S sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(row[e] - mx));
  const S inv = S(1) / sum;
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
}

template <typename S>
inline bool all_finite(const S* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(row[i])) return false;
  return true;
}

// H = h + noise for one row. pre is x·W_noise (learned) or null.
template <typename S>
inline void noisy_row(S* H, const S* h, const S* eps, const S* pre, int64_t E,
                      const RouterConfig& cfg) {
  for (int64_t e = 0; e < E; ++e) {
    S scale;
    if (cfg.noise == Noise::fixed)
      scale = static_cast<S>(cfg.noise_stddev);
    else
      scale = cfg.noise_scale == NoiseScale::softplus ? softplus(pre[e]) : pre[e];
    H[e] = h[e] + scale * eps[e];
  }
}

}  // namespace moe::detail
