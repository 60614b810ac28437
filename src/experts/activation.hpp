// Expert activations and their derivatives on any scalar type (docs/math.md §experts).
// GELU is the exact erf form, not the tanh approximation.
#pragma once
#include <cmath>

#include "common/row_math.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

template <typename S>
inline S silu(S z) {
  return z * sigmoid(z);
}

template <typename S>
inline S act_forward(Activation a, S z) {
  switch (a) {
    case Activation::relu:
      return z > S(0) ? z : S(0);
    case Activation::gelu:
      return S(0.5) * z * (S(1) + std::erf(z * S(0.70710678118654752440)));
    case Activation::silu:
      return silu(z);
  }
  return z;
}

// d act / dz at z. ReLU's derivative at 0 is taken as 0.
template <typename S>
inline S act_grad(Activation a, S z) {
  switch (a) {
    case Activation::relu:
      return z > S(0) ? S(1) : S(0);
    case Activation::gelu: {
      const S cdf = S(0.5) * (S(1) + std::erf(z * S(0.70710678118654752440)));
      const S pdf = S(0.39894228040143267794) * std::exp(S(-0.5) * z * z);
      return cdf + z * pdf;
    }
    case Activation::silu: {
      const S s = sigmoid(z);
      return s * (S(1) + z * (S(1) - s));
    }
  }
  return S(1);
}

}  // namespace moe::detail
