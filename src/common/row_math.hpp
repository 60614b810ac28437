// Scalar math on one value or one row, shared by the router, the losses and the experts:
// softplus, sigmoid, the stable softmaxes and a finiteness check.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moe::detail {

// Per-row helpers on any scalar type, in plain loops and libm: the reference router, the
// layer's reference twin (layer/layer_ref.hpp), the balancing loss and the experts'
// activations use them. The fast router runs its own blocked float kernels
// (router/router.cpp, common/vec_math.hpp) and is tested against these formulas.
template <typename S>
inline S softplus(S z) {  // max(z, 0) + log1p(exp(-|z|)): never overflows
  return std::max(z, S(0)) + std::log1p(std::exp(-std::abs(z)));
}
template <typename S>
inline S sigmoid(S z) {
  return z >= S(0) ? S(1) / (S(1) + std::exp(-z)) : std::exp(z) / (S(1) + std::exp(z));
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

}  // namespace moe::detail
