// The reference twin of precision int8 (STYLE.md items 2 and 13): one expert applied to one
// row as obvious loops on any scalar type, on the same quantized operands as the fast path
// (experts/int8.hpp: per-column weight scales, per-row activation scales, the same rounding),
// dequantized and summed in S. The layer, shared-expert and expert-choice twins call it when
// cfg.precision is int8.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "experts/activation.hpp"
#include "experts/int8.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

// out (n) = the values of v (n) after per-vector quantization (v is taken as fp32, as the
// fast path holds it).
template <typename S>
void int8_dequantized_row_ref(S* out, const S* v, int64_t n) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(v[i]), a = std::fabs(f);
    amax = a > amax ? a : amax;
    nan = nan || f != f;
  }
  const float s = int8_scale(amax, nan);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<S>(quantize_int8(static_cast<float>(v[i]), s)) * static_cast<S>(s);
}

// A stack of E weights (E, K, N), each column quantized, dequantized into S.
template <typename S>
std::vector<S> int8_dequantized_stack_ref(const std::vector<S>& W, int64_t E, int64_t K,
                                          int64_t N) {
  std::vector<S> out(W.size());
  std::vector<S> col(static_cast<size_t>(K)), q(static_cast<size_t>(K));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t i = 0; i < K; ++i) col[i] = W[(e * K + i) * N + j];
      int8_dequantized_row_ref(q.data(), col.data(), K);
      for (int64_t i = 0; i < K; ++i) out[(e * K + i) * N + j] = q[i];
    }
  return out;
}

// The dequantized weights of a stack of E experts of cfg's kind and hidden width F (the
// routed experts' cfg.hidden(), the shared ones' cfg.shared_hidden()); W2, W3 empty when
// absent. Biases as the layer stacks them, empty when absent.
template <typename S>
struct Int8RefExperts {
  std::vector<S> W1, W2, W3;
  std::vector<S> b1, b2, b3;
  int64_t F = 0;
  static Int8RefExperts of(const std::vector<S>& W1, const std::vector<S>& W2,
                           const std::vector<S>& W3, int64_t E, int64_t F, const MoEConfig& cfg) {
    const int64_t d = cfg.d_model, Do = cfg.out_dim();
    const bool lin = cfg.expert == ExpertKind::linear_relu;
    Int8RefExperts r;
    r.F = F;
    r.W1 = int8_dequantized_stack_ref(W1, E, d, lin ? Do : F);
    if (!lin) r.W2 = int8_dequantized_stack_ref(W2, E, F, Do);
    if (gated_kind(cfg.expert)) r.W3 = int8_dequantized_stack_ref(W3, E, d, F);
    return r;
  }
  Int8RefExperts& with_biases(const std::vector<S>& b1_, const std::vector<S>& b2_,
                              const std::vector<S>& b3_) {
    b1 = b1_;
    b2 = b2_;
    b3 = b3_;
    return *this;
  }
};

// out (Do) = expert e of q (dequantized weights W1, W2, W3, biases b1, b2, b3, width F)
// applied to the row x (d), each product's rows rounded on entry as round_row(out, v, n, N)
// says (n values, for a product of N columns):
// the twin of every quantized precision (int8 here, the low-bit ones in
// experts/lowbit_ref.hpp).
template <typename S, typename Q, typename RoundRow>
void expert_row_quantized_ref(S* out, const S* x, const Q& q, int64_t e, const MoEConfig& cfg,
                              RoundRow&& round_row) {
  const int64_t d = cfg.d_model, F = q.F, Do = cfg.out_dim();
  const std::vector<S>&b1 = q.b1, &b2 = q.b2, &b3 = q.b3;
  const int64_t W1w = cfg.expert == ExpertKind::linear_relu ? Do : F;
  std::vector<S> xq(static_cast<size_t>(d)), a1(static_cast<size_t>(W1w)),
      hid(static_cast<size_t>(F)), hq(static_cast<size_t>(F));
  round_row(xq.data(), x, d, W1w);
  for (int64_t c = 0; c < W1w; ++c) {
    S acc = 0;
    for (int64_t i = 0; i < d; ++i) acc += xq[i] * q.W1[(e * d + i) * W1w + c];
    a1[c] = acc + (b1.empty() ? S(0) : b1[e * W1w + c]);
  }
  if (cfg.expert == ExpertKind::linear_relu) {
    for (int64_t c = 0; c < Do; ++c) out[c] = act_forward(Activation::relu, a1[c]);
    return;
  }
  for (int64_t f = 0; f < F; ++f) {
    if (cfg.expert == ExpertKind::mlp) {
      hid[f] = act_forward(cfg.activation, a1[f]);
    } else {
      S a3 = 0;
      for (int64_t i = 0; i < d; ++i) a3 += xq[i] * q.W3[(e * d + i) * F + f];
      a3 += b3.empty() ? S(0) : b3[e * F + f];
      hid[f] = cfg.expert == ExpertKind::clamped_swiglu
                   ? clamped_swiglu(a1[f], a3, static_cast<S>(cfg.swiglu_alpha),
                                    static_cast<S>(cfg.swiglu_limit))
                   : silu(a1[f]) * a3;
    }
  }
  round_row(hq.data(), hid.data(), F, Do);
  for (int64_t c = 0; c < Do; ++c) {
    S acc = 0;
    for (int64_t f = 0; f < F; ++f) acc += hq[f] * q.W2[(e * F + f) * Do + c];
    out[c] = acc + (b2.empty() ? S(0) : b2[e * Do + c]);
  }
}

// out (Do) = expert e of q applied to the row x (d), rows quantized as the int8 path does.
template <typename S>
void expert_row_int8_ref(S* out, const S* x, const Int8RefExperts<S>& q, int64_t e,
                         const MoEConfig& cfg) {
  expert_row_quantized_ref(out, x, q, e, cfg, [](S* o, const S* v, int64_t n, int64_t) {
    int8_dequantized_row_ref(o, v, n);
  });
}

}  // namespace moe::detail
