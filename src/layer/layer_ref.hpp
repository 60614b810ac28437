// The reference twin of the MoE layer (STYLE.md item 2): forward and backward of the whole
// layer — router, noise from a caller-given ε, KeepTopK, capacity and both drop policies,
// experts, combine, losses, residual — as obvious loops on any scalar type. It is the oracle
// of the fast layer's tests and, in double, the subject of the gradient checks. It shares
// with the fast path only what must be identical: the per-row routing helpers
// (router/router_rows.hpp), the integer capacity plan (dispatch/capacity_plan.hpp), the loss
// formulas (losses/losses.hpp) and the activations (experts/activation.hpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "dispatch/capacity_plan.hpp"
#include "experts/activation.hpp"
#include "experts/int8_ref.hpp"
#include "experts/lowbit_ref.hpp"
#include "losses/balancing.hpp"
#include "losses/losses.hpp"
#include "moe/layer.hpp"
#include "layer/shared_experts.hpp"
#include "router/router_rows.hpp"

namespace moe::detail {

// v rounded to the nearest bf16 (through float), in the twin's own type.
template <typename S>
S bf16_of(S v) {
  return static_cast<S>(round_bf16(static_cast<float>(v)));
}

// Parameters (or their gradients) with the layer's names and shapes; absent ones are empty.
template <typename S>
struct RefParams {
  std::vector<S> W_g, b_g, W_noise, W1, b1, W2, b2, W3, b3;
  SharedRefParams<S> shared;  // n_shared_experts > 0

  std::vector<S>& get(const std::string& n) {
    if (n == "Ws1") return shared.Ws1;
    if (n == "bs1") return shared.bs1;
    if (n == "Ws2") return shared.Ws2;
    if (n == "bs2") return shared.bs2;
    if (n == "Ws3") return shared.Ws3;
    if (n == "bs3") return shared.bs3;
    if (n == "b3") return b3;
    if (n == "w_shared_gate") return shared.w_shared_gate;
    if (n == "W_g") return W_g;
    if (n == "b_g") return b_g;
    if (n == "W_noise") return W_noise;
    if (n == "W1") return W1;
    if (n == "b1") return b1;
    if (n == "W2") return W2;
    if (n == "b2") return b2;
    MOE_ASSERT(n == "W3");
    return W3;
  }
  const std::vector<S>& get(const std::string& n) const {
    return const_cast<RefParams*>(this)->get(n);
  }

  // A copy of a layer's parameters in S.
  static RefParams from(const MoELayer& layer) {
    RefParams r;
    for (const auto& n : layer.parameter_names()) {
      const Tensor& t = layer.param(n);
      r.get(n).assign(t.data.begin(), t.data.end());
    }
    return r;
  }
  // Zeros shaped like a layer's parameters.
  static RefParams zeros_like(const MoELayer& layer) {
    RefParams r;
    for (const auto& n : layer.parameter_names())
      r.get(n).assign(static_cast<size_t>(layer.param(n).numel()), S(0));
    return r;
  }
};

// What the reference forward keeps. Expert activations are per assignment a = t·k + j
// (rows of dropped assignments are left at zero).
template <typename S>
struct RefSaved {
  int64_t T = 0;
  bool noisy = false;
  std::vector<S> x;                          // (T, d)
  std::vector<S> h, pre, eps, H, probs;      // (T, E)
  std::vector<int32_t> indices;              // (T, k)
  std::vector<S> weights;                    // (T, k)
  CapacityPlan plan;
  std::vector<S> a1, a3, hid, out;           // (T·k, width)
  double aux_loss = 0.0, z_loss = 0.0;
};

// The balancing loss's view of the reference's saved routing (aux_loss "global" is taken
// over the batch alone: the reference keeps no state between calls).
template <typename S>
BalanceInputs<S> ref_balance_inputs(const RefSaved<S>& sv, const MoEConfig& cfg) {
  BalanceInputs<S> in;
  in.T = sv.T;
  in.k = cfg.k;
  in.E = cfg.n_experts;
  in.indices = sv.indices.data();
  in.weights = sv.weights.data();
  in.probs = sv.probs.data();
  in.h = sv.h.data();
  in.H = sv.H.data();
  in.noisy = sv.noisy;
  in.eps = sv.eps.data();
  in.pre = sv.pre.data();
  return in;
}

// y is (T, d_out), x (T, d). eps (T, E) is required when training with noise. step and
// token_offset key the random draws of dispatch (drop_policy / second_expert_policy random).
// sel_bias (E), when given, is the layer's selection bias (expert_bias), added to the scores
// for selection only.
template <typename S>
void layer_forward_ref(std::vector<S>& y, RefSaved<S>& sv, const S* x, const RefParams<S>& p,
                       const MoEConfig& cfg, int64_t T, bool training, const S* eps,
                       uint64_t step = 0, int64_t token_offset = 0,
                       const float* sel_bias = nullptr) {
  cfg.validate();
  const RouterConfig rc = cfg.router();
  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k, F = cfg.hidden(),
                Do = cfg.out_dim();
  const int64_t A = T * k;
  const int64_t W1w = cfg.expert == ExpertKind::linear_relu ? Do : F;  // width of a1
  sv.T = T;
  sv.noisy = training && cfg.noise != Noise::none;
  MOE_ASSERT(!sv.noisy || T == 0 || eps != nullptr);
  // The router family's score functions, scaling, groups and selection bias run here
  // (router/scores.hpp); jitter has no input in this twin.
  MOE_ASSERT(!training || cfg.jitter == 0.0f);
  sv.x.assign(x, x + T * d);
  sv.h.assign(static_cast<size_t>(T * E), S(0));
  sv.pre.assign(static_cast<size_t>(T * E), S(0));
  sv.eps.assign(static_cast<size_t>(T * E), S(0));
  sv.H.assign(static_cast<size_t>(T * E), S(0));
  sv.probs.assign(static_cast<size_t>(T * E), S(0));
  sv.indices.assign(static_cast<size_t>(A), 0);
  sv.weights.assign(static_cast<size_t>(A), S(0));

  // Router.
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const S* xt = x + t * d;
    S* h = &sv.h[t * E];
    S* pre = &sv.pre[t * E];
    for (int64_t e = 0; e < E; ++e) {
      h[e] = cfg.router_bias ? p.b_g[e] : S(0);
      for (int64_t i = 0; i < d; ++i) h[e] += xt[i] * p.W_g[i * E + e];
      if (cfg.round_router_logits) h[e] = bf16_of(h[e]);  // the logits as the model's dtype
      if (sv.noisy && cfg.noise == Noise::learned)
        for (int64_t i = 0; i < d; ++i) pre[e] += xt[i] * p.W_noise[i * E + e];
    }
    S* H = &sv.H[t * E];
    if (sv.noisy) {
      std::copy(eps + t * E, eps + (t + 1) * E, &sv.eps[t * E]);
      noisy_row(H, h, &sv.eps[t * E], pre, E, rc);
    } else {
      std::copy(h, h + E, H);
    }
    if (!router_scores_default(rc, sel_bias) || rc.scaling_factor != 1.0f) {
      route_row_ref<S>(&sv.indices[t * k], &sv.weights[t * k], &sv.probs[t * E], nullptr, H,
                       sel_bias, rc);
      continue;
    }
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return outranks(H[a], a, H[b], b, cfg.tie_break == TieBreak::high);
    });
    for (int64_t j = 0; j < k; ++j) {
      sv.indices[t * k + j] = order[j];
      sv.weights[t * k + j] = H[order[j]];
    }
    softmax_kept(&sv.weights[t * k], &sv.weights[t * k], k);
    softmax_row(&sv.probs[t * E], H, E);
  }
  sv.aux_loss = balancing_loss<S>(BalanceGrads<S>{}, ref_balance_inputs(sv, cfg),
                                  BalanceSpec::of(cfg));
  sv.z_loss = router_z_loss_t<S>(nullptr, sv.h.data(), T, E, cfg.z_alpha);

  // Capacity.
  PlanOptions po;
  po.C = cfg.capacity(T);
  po.policy = cfg.drop_policy;
  po.second = cfg.second_expert_policy;
  po.seed = cfg.seed;
  po.step = step;
  po.token_offset = token_offset;
  build_capacity_plan<S>(sv.plan, sv.indices.data(), sv.weights.data(), T, k, E, po);

  // Experts, one kept assignment at a time.
  sv.a1.assign(static_cast<size_t>(A * W1w), S(0));
  sv.a3.assign(static_cast<size_t>(A * F), S(0));
  sv.hid.assign(static_cast<size_t>(A * F), S(0));
  sv.out.assign(static_cast<size_t>(A * Do), S(0));
  // precision bf16: every expert product's operands rounded to bf16 (SPEC §6), the sums in S.
  const auto q = [bf = cfg.precision == Precision::bf16](S v) { return bf ? bf16_of(v) : v; };
  std::vector<S> xq(static_cast<size_t>(d));
  // round_each_op (bf16, transformers' order): each step's result rounded to bf16 — the
  // product, then the bias added, the activation, and each op of the glu (r is q's rounding).
  const bool each_op = cfg.round_each_op;
  const auto r = [each_op](S v) { return each_op ? bf16_of(v) : v; };
  // The product, then its bias (0 adds nothing to a bf16 value; r is the identity when off).
  const auto linear = [&](S sum, const std::vector<S>& bias, int64_t at) {
    return r(r(sum) + (bias.empty() ? S(0) : bias[at]));
  };
  // GPT-OSS's clamped glu op by op: g·σ(α·g) with α·g and σ rounded, u + 1, the product.
  const auto clamped_swiglu_by_op = [&](S g, S u) {
    const S L = S(cfg.swiglu_limit);
    g = std::min(g, L);
    u = std::min(std::max(u, -L), L);
    const S sg = r(S(1) / (S(1) + std::exp(-r(g * S(cfg.swiglu_alpha)))));
    return r(r(u + S(1)) * r(g * sg));
  };
  // precision int8 (evaluation): the quantized twin (experts/int8_ref.hpp); out only.
  const bool int8 = cfg.precision == Precision::int8;
  Int8RefExperts<S> i8;
  if (int8) i8 = Int8RefExperts<S>::of(p.W1, p.W2, p.W3, E, cfg.hidden(), cfg)
                     .with_biases(p.b1, p.b2, p.b3);
  // low-bit precisions (evaluation): the twin on the held values (experts/lowbit_ref.hpp),
  // with each expert's row count (which kernel, so which rounding); out only.
  const bool lowbit = low_bit(cfg.precision);
  LowbitRefExperts<S> lb;
  std::vector<int64_t> rows_of(static_cast<size_t>(E), 0);
  if (lowbit) {
    lb = LowbitRefExperts<S>::of(p.W1, p.W2, p.W3, cfg.hidden(), cfg).with_biases(p.b1, p.b2, p.b3);
    for (int64_t a = 0; a < A; ++a)
      if (sv.plan.src_to_dest[a] >= 0) ++rows_of[static_cast<size_t>(sv.indices[a])];
  }
  for (int64_t a = 0; a < A; ++a) {
    if (sv.plan.src_to_dest[a] < 0) continue;
    const int64_t e = sv.indices[a];
    if (int8) {
      expert_row_int8_ref(&sv.out[a * Do], x + (a / k) * d, i8, e, cfg);
      continue;
    }
    if (lowbit) {
      expert_row_lowbit_ref(&sv.out[a * Do], x + (a / k) * d, lb, e, cfg,
                            rows_of[static_cast<size_t>(e)]);
      continue;
    }
    for (int64_t i = 0; i < d; ++i) xq[i] = q(x[(a / k) * d + i]);
    const S* xt = xq.data();
    S* a1 = &sv.a1[a * W1w];
    S* a3 = &sv.a3[a * F];
    S* hid = &sv.hid[a * F];
    S* out = &sv.out[a * Do];
    const S* W1 = &p.W1[e * d * W1w];
    for (int64_t c = 0; c < W1w; ++c) {
      S sum = 0;
      for (int64_t i = 0; i < d; ++i) sum += xt[i] * q(W1[i * W1w + c]);
      a1[c] = linear(sum, p.b1, e * W1w + c);
    }
    switch (cfg.expert) {
      case ExpertKind::linear_relu:
        for (int64_t c = 0; c < Do; ++c) out[c] = r(act_forward(Activation::relu, a1[c]));
        continue;
      case ExpertKind::mlp:
        for (int64_t f = 0; f < F; ++f) hid[f] = q(act_forward(cfg.activation, a1[f]));
        break;
      case ExpertKind::swiglu:
        for (int64_t f = 0; f < F; ++f) {
          S sum = 0;
          for (int64_t i = 0; i < d; ++i) sum += xt[i] * q(p.W3[(e * d + i) * F + f]);
          a3[f] = r(sum);
          hid[f] = q(r(silu(a1[f])) * a3[f]);
        }
        break;
      case ExpertKind::clamped_swiglu:
        for (int64_t f = 0; f < F; ++f) {
          S sum = 0;
          for (int64_t i = 0; i < d; ++i) sum += xt[i] * q(p.W3[(e * d + i) * F + f]);
          a3[f] = linear(sum, p.b3, e * F + f);
          hid[f] = q(each_op ? clamped_swiglu_by_op(a1[f], a3[f])
                             : clamped_swiglu(a1[f], a3[f], S(cfg.swiglu_alpha),
                                              S(cfg.swiglu_limit)));
        }
        break;
    }
    // hid is saved rounded: backward's dW2 product takes it as its bf16 operand.
    for (int64_t c = 0; c < Do; ++c) {
      S sum = 0;
      for (int64_t f = 0; f < F; ++f) sum += hid[f] * q(p.W2[(e * F + f) * Do + c]);
      out[c] = linear(sum, p.b2, e * Do + c);
    }
  }

  // Combine.
  y.assign(static_cast<size_t>(T * Do), S(0));
  for (int64_t t = 0; t < T; ++t) {
    if (cfg.residual)
      for (int64_t c = 0; c < Do; ++c) y[t * Do + c] = x[t * d + c];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      if (sv.plan.src_to_dest[a] < 0) continue;
      // round_gate_weights: each weighted output rounded to bf16 before the sum over k.
      for (int64_t c = 0; c < Do; ++c) {
        const S wy = sv.weights[a] * sv.out[a * Do + c];
        y[t * Do + c] += cfg.round_gate_weights ? bf16_of(wy) : wy;
      }
    }
  }
  if (cfg.n_shared_experts > 0) shared_forward_ref<S>(y.data(), x, T, p.shared, cfg);
}

// dx (T, d) is assigned; g accumulates (its vectors must be sized like p's).
template <typename S>
void layer_backward_ref(std::vector<S>& dx, RefParams<S>& g, const S* dy, const RefSaved<S>& sv,
                        const RefParams<S>& p, const MoEConfig& cfg) {
  const int64_t T = sv.T, d = cfg.d_model, E = cfg.n_experts, k = cfg.k, F = cfg.hidden(),
                Do = cfg.out_dim();
  const int64_t W1w = cfg.expert == ExpertKind::linear_relu ? Do : F;
  const S* x = sv.x.data();
  dx.assign(static_cast<size_t>(T * d), S(0));
  std::vector<S> dG(static_cast<size_t>(T * k), S(0));
  std::vector<S> dout(static_cast<size_t>(Do)), dh(static_cast<size_t>(F)),
      da1(static_cast<size_t>(W1w)), da3(static_cast<size_t>(F));

  // Combine and experts, one kept assignment at a time. precision bf16: the products'
  // operands (x, dout, da1, da3, the weights) rounded to bf16; the bias gradients are not
  // products and take the unrounded values.
  const auto q = [bf = cfg.precision == Precision::bf16](S v) { return bf ? bf16_of(v) : v; };
  std::vector<S> xq(static_cast<size_t>(d)), doutq(static_cast<size_t>(Do)),
      da1q(static_cast<size_t>(W1w)), da3q(static_cast<size_t>(F));
  for (int64_t a = 0; a < T * k; ++a) {
    if (sv.plan.src_to_dest[a] < 0) continue;
    const int64_t t = a / k, e = sv.indices[a];
    for (int64_t i = 0; i < d; ++i) xq[i] = q(x[t * d + i]);
    const S* xt = xq.data();
    const S* dyt = dy + t * Do;
    const S* out = &sv.out[a * Do];
    const S* a1 = &sv.a1[a * W1w];
    const S* a3 = &sv.a3[a * F];
    const S* hid = &sv.hid[a * F];
    for (int64_t c = 0; c < Do; ++c) {
      dG[a] += dyt[c] * out[c];
      dout[c] = sv.weights[a] * dyt[c];
      doutq[c] = q(dout[c]);
    }
    if (cfg.expert == ExpertKind::linear_relu) {
      for (int64_t c = 0; c < Do; ++c) da1[c] = dout[c] * act_grad(Activation::relu, a1[c]);
    } else {
      for (int64_t f = 0; f < F; ++f) {
        dh[f] = 0;
        for (int64_t c = 0; c < Do; ++c) {
          dh[f] += doutq[c] * q(p.W2[(e * F + f) * Do + c]);
          g.W2[(e * F + f) * Do + c] += hid[f] * doutq[c];
        }
      }
      if (!g.b2.empty())
        for (int64_t c = 0; c < Do; ++c) g.b2[e * Do + c] += dout[c];
      for (int64_t f = 0; f < F; ++f) {
        if (cfg.expert == ExpertKind::mlp) {
          da1[f] = dh[f] * act_grad(cfg.activation, a1[f]);
        } else if (cfg.expert == ExpertKind::swiglu) {
          da1[f] = dh[f] * a3[f] * act_grad(Activation::silu, a1[f]);
          da3[f] = dh[f] * silu(a1[f]);
        } else {
          S d1, d3;
          clamped_swiglu_grad(&d1, &d3, a1[f], a3[f], S(cfg.swiglu_alpha), S(cfg.swiglu_limit));
          da1[f] = dh[f] * d1;
          da3[f] = dh[f] * d3;
        }
      }
    }
    for (int64_t c = 0; c < W1w; ++c) da1q[c] = q(da1[c]);
    for (int64_t c = 0; c < W1w; ++c) {
      if (!g.b1.empty()) g.b1[e * W1w + c] += da1[c];
      for (int64_t i = 0; i < d; ++i) {
        g.W1[(e * d + i) * W1w + c] += xt[i] * da1q[c];
        dx[t * d + i] += da1q[c] * q(p.W1[(e * d + i) * W1w + c]);
      }
    }
    if (cfg.expert == ExpertKind::swiglu || cfg.expert == ExpertKind::clamped_swiglu)
      for (int64_t f = 0; f < F; ++f) {
        if (!g.b3.empty()) g.b3[e * F + f] += da3[f];
        da3q[f] = q(da3[f]);
        for (int64_t i = 0; i < d; ++i) {
          g.W3[(e * d + i) * F + f] += xt[i] * da3q[f];
          dx[t * d + i] += da3q[f] * q(p.W3[(e * d + i) * F + f]);
        }
      }
  }

  // Losses: the balancing loss through P = mean(probs) only, the z-loss through h.
  std::vector<S> dprobs(static_cast<size_t>(T * E)), dlogits(static_cast<size_t>(T * E));
  std::vector<S> dh_bal(static_cast<size_t>(T * E), S(0)), dpre_bal(static_cast<size_t>(T * E), S(0));
  balancing_loss<S>(BalanceGrads<S>{dprobs.data(), dG.data(), dh_bal.data(), dpre_bal.data()},
                    ref_balance_inputs(sv, cfg), BalanceSpec::of(cfg));
  router_z_loss_t<S>(dlogits.data(), sv.h.data(), T, E, cfg.z_alpha);

  // Router: softmax over the kept logits and the full softmax, both back to H; KeepTopK is
  // piecewise constant, so the selection itself carries no gradient.
  const RouterConfig rc = cfg.router();
  const bool family = !kept_softmax_kind(cfg.router_kind) || cfg.scaling_factor != 1.0f;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<S> dH(static_cast<size_t>(E), S(0));
    if (family) {  // router/scores.hpp; sigmoid's scores recomputed from H
      std::vector<S> scr(static_cast<size_t>(E)), s(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) s[e] = sigmoid_score(sv.H[t * E + e]);
      scores_backward_row<S>(dH.data(), scr.data(), &dG[t * k], &dprobs[t * E],
                             &sv.indices[t * k], &sv.weights[t * k], &sv.probs[t * E], s.data(),
                             &sv.H[t * E], rc);
    } else {
      S dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += sv.weights[t * k + j] * dG[t * k + j];
      for (int64_t j = 0; j < k; ++j)
        dH[sv.indices[t * k + j]] += sv.weights[t * k + j] * (dG[t * k + j] - dot);
      S pdot = 0;
      for (int64_t e = 0; e < E; ++e) pdot += sv.probs[t * E + e] * dprobs[t * E + e];
      for (int64_t e = 0; e < E; ++e) dH[e] += sv.probs[t * E + e] * (dprobs[t * E + e] - pdot);
    }
    for (int64_t e = 0; e < E; ++e) {
      const S dhe = dH[e] + dlogits[t * E + e] + dh_bal[t * E + e];  // ∂H/∂h = 1
      S dpre = 0;
      if (sv.noisy && cfg.noise == Noise::learned) {
        const S z = sv.pre[t * E + e];
        const S ds = cfg.noise_scale == NoiseScale::softplus ? sigmoid(z) : S(1);
        dpre = dH[e] * sv.eps[t * E + e] * ds + dpre_bal[t * E + e];
      }
      if (!g.b_g.empty()) g.b_g[e] += dhe;
      for (int64_t i = 0; i < d; ++i) {
        g.W_g[i * E + e] += x[t * d + i] * dhe;
        dx[t * d + i] += dhe * p.W_g[i * E + e];
        if (sv.noisy && cfg.noise == Noise::learned) {
          g.W_noise[i * E + e] += x[t * d + i] * dpre;
          dx[t * d + i] += dpre * p.W_noise[i * E + e];
        }
      }
    }
  }
  if (cfg.residual)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < d; ++c) dx[t * d + c] += dy[t * Do + c];
  if (cfg.n_shared_experts > 0) shared_backward_ref<S>(dx.data(), g.shared, dy, x, T, p.shared, cfg);
}

}  // namespace moe::detail
