// The reference twin of the expert-choice layer (STYLE.md item 2): forward as obvious loops
// on any scalar type — router with noise from a caller-given ε, S = softmax(H), each expert's
// C best tokens by a stable sort of its column, experts one (token, expert) pair at a time,
// and the per-token combine in expert order. In double it is the function whose central
// differences check the fast layer's backward (tests/cpp/test_expert_choice.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "layer/layer_ref.hpp"
#include "router/expert_choice.hpp"

namespace moe::detail {

template <typename S>
struct ExpertChoiceRefSaved {
  int64_t T = 0, C = 0;
  std::vector<S> h, H, probs;     // (T, E)
  std::vector<int32_t> tokens;    // (E, C) best first
  std::vector<S> gates;           // (E, C)
  double z_loss = 0.0;
};

// out (Do) = expert e applied to one row xt (d).
template <typename S>
void expert_row_ref(S* out, const S* xt, const RefParams<S>& p, const MoEConfig& cfg,
                    int64_t e) {
  const int64_t d = cfg.d_model, F = cfg.hidden(), Do = cfg.out_dim();
  const int64_t W1w = cfg.expert == ExpertKind::linear_relu ? Do : F;
  std::vector<S> a1(static_cast<size_t>(W1w)), hid(static_cast<size_t>(F));
  for (int64_t c = 0; c < W1w; ++c) {
    a1[c] = p.b1.empty() ? S(0) : p.b1[e * W1w + c];
    for (int64_t i = 0; i < d; ++i) a1[c] += xt[i] * p.W1[(e * d + i) * W1w + c];
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
      for (int64_t i = 0; i < d; ++i) a3 += xt[i] * p.W3[(e * d + i) * F + f];
      hid[f] = silu(a1[f]) * a3;
    }
  }
  for (int64_t c = 0; c < Do; ++c) {
    out[c] = p.b2.empty() ? S(0) : p.b2[e * Do + c];
    for (int64_t f = 0; f < F; ++f) out[c] += hid[f] * p.W2[(e * F + f) * Do + c];
  }
}

// y is (T, d_out), x (T, d). eps (T, E) is required when training with noise.
template <typename S>
void expert_choice_forward_ref(std::vector<S>& y, ExpertChoiceRefSaved<S>& sv, const S* x,
                               const RefParams<S>& p, const MoEConfig& cfg, int64_t T,
                               bool training, const S* eps) {
  cfg.validate();
  MOE_ASSERT(cfg.router_kind == RouterKind::expert_choice);
  const RouterConfig rc = cfg.router();
  const int64_t d = cfg.d_model, E = cfg.n_experts, Do = cfg.out_dim();
  const bool noisy = training && cfg.noise != Noise::none;
  MOE_ASSERT(!noisy || T == 0 || eps != nullptr);
  sv.T = T;
  sv.h.assign(static_cast<size_t>(T * E), S(0));
  sv.H.assign(static_cast<size_t>(T * E), S(0));
  sv.probs.assign(static_cast<size_t>(T * E), S(0));
  std::vector<S> pre(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const S* xt = x + t * d;
    S* h = &sv.h[t * E];
    for (int64_t e = 0; e < E; ++e) {
      h[e] = cfg.router_bias ? p.b_g[e] : S(0);
      pre[e] = 0;
      for (int64_t i = 0; i < d; ++i) h[e] += xt[i] * p.W_g[i * E + e];
      if (noisy && cfg.noise == Noise::learned)
        for (int64_t i = 0; i < d; ++i) pre[e] += xt[i] * p.W_noise[i * E + e];
    }
    if (noisy)
      noisy_row(&sv.H[t * E], h, eps + t * E, pre.data(), E, rc);
    else
      std::copy(h, h + E, &sv.H[t * E]);
    softmax_row(&sv.probs[t * E], &sv.H[t * E], E);
  }
  sv.z_loss = router_z_loss_t<S>(nullptr, sv.h.data(), T, E, cfg.z_alpha);

  // Each expert's C best tokens: a stable sort keeps equal scores in token order.
  const int64_t C = expert_choice_capacity(cfg, T);
  sv.C = C;
  sv.tokens.assign(static_cast<size_t>(E * C), 0);
  sv.gates.assign(static_cast<size_t>(E * C), S(0));
  std::vector<int32_t> ord(static_cast<size_t>(T));
  std::vector<S> gate(static_cast<size_t>(T * E), S(0));  // (T, E), 0 where not chosen
  std::vector<char> chosen(static_cast<size_t>(T * E), 0);
  for (int64_t e = 0; e < E; ++e) {
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) {
      return sv.probs[a * E + e] > sv.probs[b * E + e];
    });
    for (int64_t c = 0; c < C; ++c) {
      const int64_t t = ord[c];
      sv.tokens[e * C + c] = static_cast<int32_t>(t);
      sv.gates[e * C + c] = sv.probs[t * E + e];
      gate[t * E + e] = sv.probs[t * E + e];
      chosen[t * E + e] = 1;
    }
  }

  y.assign(static_cast<size_t>(T * Do), S(0));
  std::vector<S> out(static_cast<size_t>(Do));
  // precision int8 (evaluation): the quantized twin (experts/int8_ref.hpp).
  const bool int8 = cfg.precision == Precision::int8;
  Int8RefExperts<S> i8;
  if (int8) i8 = Int8RefExperts<S>::of(p.W1, p.W2, p.W3, E, cfg.hidden(), cfg)
                     .with_biases(p.b1, p.b2, p.b3);
  for (int64_t t = 0; t < T; ++t) {
    if (cfg.residual)
      for (int64_t c = 0; c < Do; ++c) y[t * Do + c] = x[t * d + c];
    for (int64_t e = 0; e < E; ++e) {
      if (!chosen[t * E + e]) continue;
      if (int8)
        expert_row_int8_ref(out.data(), x + t * d, i8, e, cfg);
      else
        expert_row_ref(out.data(), x + t * d, p, cfg, e);
      for (int64_t c = 0; c < Do; ++c) y[t * Do + c] += gate[t * E + e] * out[c];
    }
  }
}

}  // namespace moe::detail
