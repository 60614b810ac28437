// The dispatch's row moves, one implementation for every layer (MoELayer's forward,
// forward_routed and their backwards, the expert-parallel layer): by the plan's index maps
// (dispatch/capacity_plan.hpp) — dest_to_src (slot s → assignment a = t·k + j) and
// src_to_dest (assignment → slot, -1 when dropped) — with no atomics and a fixed order, so
// the results are the same bits whatever the thread count and whoever calls.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/bf16.hpp"
#include "common/parallel.hpp"

namespace moe::detail {

// xg (R, d): slot s gets its token's row of x (T, d).
inline void gather_rows(float* xg, const float* x, const int32_t* d2s, int64_t R, int64_t k,
                        int64_t d) {
#pragma omp parallel for schedule(static) if (R * d >= kParallelMin)
  for (int64_t s = 0; s < R; ++s) {
    const float* src = x + (d2s[s] / k) * d;
    std::copy(src, src + d, xg + s * d);
  }
}

// y (T, Do) = x (the residual, when given; Do = d) + Σ_j w[t·k + j] · out[slot of (t, j)],
// j in rank order, dropped assignments skipped. round_products (MoEConfig's
// round_gate_weights): each w·out rounded to bf16 before it is added, as a bf16 model's
// transformers block weights its experts' outputs.
inline void combine_rows(float* y, const float* out, const int32_t* s2d, const float* w,
                         int64_t T, int64_t k, int64_t Do, const float* residual,
                         bool round_products = false) {
#pragma omp parallel for schedule(static) if (T * k * Do >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* yt = y + t * Do;
    if (residual)
      std::copy(residual + t * Do, residual + (t + 1) * Do, yt);
    else
      std::fill(yt, yt + Do, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = s2d[t * k + j];
      if (s < 0) continue;
      const float g = w[t * k + j];
      const float* o = out + int64_t{s} * Do;
      if (round_products)
        for (int64_t c = 0; c < Do; ++c) yt[c] += round_bf16(g * o[c]);
      else
        for (int64_t c = 0; c < Do; ++c) yt[c] += g * o[c];
    }
  }
}

// combine_rows' backward for the outputs: dout (R, Do), slot s = w[a] · dy[token of a].
inline void combine_backward_rows(float* dout, const float* dy, const int32_t* d2s,
                                  const float* w, int64_t R, int64_t k, int64_t Do) {
#pragma omp parallel for schedule(static) if (R * Do >= kParallelMin)
  for (int64_t s = 0; s < R; ++s) {
    const int64_t a = d2s[s];
    const float g = w[a];
    const float* dyt = dy + (a / k) * Do;
    for (int64_t c = 0; c < Do; ++c) dout[s * Do + c] = g * dyt[c];
  }
}

// combine_rows' backward for the weights: dw[t·k + j] = dy_t · out[slot of (t, j)], 0 for a
// dropped assignment (it contributed nothing).
inline void combine_backward_weights(float* dw, const float* dy, const float* out,
                                     const int32_t* s2d, int64_t T, int64_t k, int64_t Do) {
#pragma omp parallel for schedule(static) if (T * k * Do >= kParallelMin)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = s2d[t * k + j];
      float acc = 0.0f;
      if (s >= 0) {
        const float* o = out + int64_t{s} * Do;
        for (int64_t c = 0; c < Do; ++c) acc += dy[t * Do + c] * o[c];
      }
      dw[t * k + j] = acc;
    }
}

// gather_rows' backward: dx (T, d) (= 0 first when assign, else +=) gets Σ_j dxg[slot of
// (t, j)] in rank order, dropped assignments skipped, then + dy (T, d) when residual is given.
inline void gather_backward_rows(float* dx, const float* dxg, const int32_t* s2d, int64_t T,
                                 int64_t k, int64_t d, bool assign, const float* residual) {
#pragma omp parallel for schedule(static) if (T * (k + 1) * d >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* dxt = dx + t * d;
    if (assign) std::fill(dxt, dxt + d, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = s2d[t * k + j];
      if (s < 0) continue;
      const float* src = dxg + int64_t{s} * d;
      for (int64_t c = 0; c < d; ++c) dxt[c] += src[c];
    }
    if (residual)
      for (int64_t c = 0; c < d; ++c) dxt[c] += residual[t * d + c];
  }
}

}  // namespace moe::detail
