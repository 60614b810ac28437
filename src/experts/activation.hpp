// Expert activations and their derivatives on any scalar type (docs/math.md §experts).
// GELU is the exact erf form, not the tanh approximation.
#pragma once
#include <algorithm>
#include <cmath>

#include "common/row_math.hpp"
#include "common/vec_math.hpp"
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

// clamped_swiglu (GPT-OSS; docs/math.md, "clamped SwiGLU"): from the two pre-activations
// a1 = x·W1 + b1 and a3 = x·W3 + b3, with g = min(a1, L) and u = clamp(a3, -L, L),
//   h = (u + 1) · g·σ(α·g).
// The clamps pass the gradient inside their range, the bounds included (as torch.clamp does),
// and nothing outside it.
template <typename S>
inline S clamped_swiglu(S a1, S a3, S alpha, S limit) {
  const S g = std::min(a1, limit);
  const S u = std::min(std::max(a3, -limit), limit);
  return (u + S(1)) * (g * sigmoid(alpha * g));
}

// Float forms of silu and clamped_swiglu for the experts' elementwise passes over R·F
// values: branch-free on exp_f32 (common/vec_math.hpp), so that those loops vectorise where
// libm's scalar expf took ~5% of a Qwen3-MoE block's forward. Within a few ulp of the forms
// above; a value's result does not depend on its position in the loop.
inline float sigmoid_f32(float z) {
  const float e = exp_f32(-abs_f32(z));  // e^{-|z|}: exp_f32's domain, no overflow
  return select_f32(z >= 0.0f, 1.0f, e) / (1.0f + e);
}
inline float silu_f32(float z) { return z * sigmoid_f32(z); }
inline float clamped_swiglu_f32(float a1, float a3, float alpha, float limit) {
  const float g = std::min(a1, limit);
  const float u = std::min(std::max(a3, -limit), limit);
  return (u + 1.0f) * (g * sigmoid_f32(alpha * g));
}

// ∂h/∂a1 and ∂h/∂a3 at (a1, a3).
template <typename S>
inline void clamped_swiglu_grad(S* d1, S* d3, S a1, S a3, S alpha, S limit) {
  const S g = std::min(a1, limit);
  const S u = std::min(std::max(a3, -limit), limit);
  const S sg = sigmoid(alpha * g);
  *d1 = a1 <= limit ? (u + S(1)) * sg * (S(1) + alpha * g * (S(1) - sg)) : S(0);
  *d3 = a3 >= -limit && a3 <= limit ? g * sg : S(0);
}

// The float forms of the backward's elementwise passes, on sigmoid_f32 like the forward's.
inline float silu_grad_f32(float z) {
  const float s = sigmoid_f32(z);
  return s * (1.0f + z * (1.0f - s));
}
inline void clamped_swiglu_grad_f32(float* d1, float* d3, float a1, float a3, float alpha,
                                    float limit) {
  const float g = std::min(a1, limit);
  const float u = std::min(std::max(a3, -limit), limit);
  const float sg = sigmoid_f32(alpha * g);
  *d1 = select_f32(a1 <= limit, (u + 1.0f) * sg * (1.0f + alpha * g * (1.0f - sg)), 0.0f);
  *d3 = select_f32((a3 >= -limit) & (a3 <= limit), g * sg, 0.0f);  // &: no branch
}

}  // namespace moe::detail
