// Shared experts (DeepSeek-MoE, Qwen-MoE): n_shared_experts always-active experts of the
// routed experts' kind and widths (the hidden width F = shared_d_ff when set, else d_ff),
// added to every token's output,
//   y_t += g_t · Σ_s shared_s(x_t),   g_t = sigmoid(x_t · w_shared_gate) with shared_gate, else 1.
// Parameters, stacked over the shared experts like the routed ones (S = n_shared_experts):
// linear_relu Ws1 (S,d,Do), bs1 (S,Do)?; mlp Ws1 (S,d,F), bs1 (S,F)?, Ws2 (S,F,Do), bs2 (S,Do)?;
// swiglu Ws1 (S,d,F), Ws2 (S,F,Do), Ws3 (S,d,F); clamped_swiglu Ws1, bs1 (S,F)?, Ws2,
// bs2 (S,Do)?, Ws3, bs3 (S,F)?; w_shared_gate (d) with shared_gate.
// The fast path reuses the routed experts' grouped kernels (experts/experts.hpp) with every
// token dispatched to every shared expert. Backward: docs/math.md, "shared experts".
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "experts/activation.hpp"
#include "experts/experts.hpp"
#include "experts/int8.hpp"
#include "experts/int8_ref.hpp"
#include "experts/lowbit_ref.hpp"
#include "experts/precision.hpp"
#include "layer/init.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

// Appends the shared experts' parameters (names and shapes above) to s.
void shared_parameter_specs(std::vector<ParamSpec>& s, const MoEConfig& cfg);

// Initialises a shared-expert parameter like its routed twin (Ws1 as W1, ...); the gate
// weight starts at zero (g = ½). Returns false when name is not a shared-expert parameter.
bool init_shared_parameter(Tensor& p, const std::string& name, const MoEConfig& cfg);

struct SharedWeights {  // by pointer, null where absent
  const float *W1 = nullptr, *b1 = nullptr, *W2 = nullptr, *b2 = nullptr, *W3 = nullptr;
  const float* w_gate = nullptr;  // (d)
  const float* b3 = nullptr;      // clamped_swiglu
};
struct SharedGrads {  // accumulated (+=)
  float *dW1 = nullptr, *db1 = nullptr, *dW2 = nullptr, *db2 = nullptr, *dW3 = nullptr;
  float* dw_gate = nullptr;
  float* db3 = nullptr;
};

// The fast shared experts with what forward saves for backward.
class SharedExperts {
 public:
  // y (T, Do) += the shared output of x (T, d). Saves x, activations and gates.
  void forward(float* y, const float* x, int64_t T, const SharedWeights& w, const MoEConfig& cfg);
  // dx (T, d) += the shared path's part for dy (T, Do); parameter gradients accumulate.
  void backward(float* dx, SharedGrads& g, const float* dy, const SharedWeights& w,
                const MoEConfig& cfg);
  // The weights may have changed: their copies in the layer's precision are made again.
  void weights_changed() { prec_.invalidate(); }
  // The shared stack's precision state (its precision is set by the owning layer; a layer
  // without masters writes the copies through it).
  ExpertPrecision& precision() { return prec_; }
  const ExpertPrecision& precision() const { return prec_; }

 private:
  int64_t T_ = 0;
  std::vector<float> xg_, a1_, a3_, hid_, out_, sum_, gate_;  // saved
  std::vector<float> dout_, dh_, da3_, dxg_;                   // backward scratch
  std::vector<int64_t> offsets_;
  GroupedGemm gg_;
  ExpertPrecision prec_;
};

// The reference twin on any scalar type (plain loops). Weights by name; a (T, Do) output
// added to y; backward adds to dx and to the gradient vectors of the same names.
template <typename S>
struct SharedRefParams {
  std::vector<S> Ws1, bs1, Ws2, bs2, Ws3, bs3, w_shared_gate;
};

template <typename S>
void shared_forward_ref(S* y, const S* x, int64_t T, const SharedRefParams<S>& p,
                        const MoEConfig& cfg) {
  const int64_t n = cfg.n_shared_experts, d = cfg.d_model, F = cfg.shared_hidden(),
                Do = cfg.out_dim();
  const bool lin = cfg.expert == ExpertKind::linear_relu;
  const int64_t W1w = lin ? Do : F;
  const S alpha = static_cast<S>(cfg.swiglu_alpha), limit = static_cast<S>(cfg.swiglu_limit);
  std::vector<S> a1(static_cast<size_t>(W1w)), hid(static_cast<size_t>(F)), sum(static_cast<size_t>(Do));
  // precision bf16: the products' operands rounded to bf16 (the gate's product is fp32).
  const auto q = [bf = cfg.precision == Precision::bf16](S v) {
    return bf ? static_cast<S>(round_bf16(static_cast<float>(v))) : v;
  };
  std::vector<S> xq(static_cast<size_t>(d));
  // precision int8 (evaluation): the quantized twin (experts/int8_ref.hpp).
  const bool int8 = cfg.precision == Precision::int8;
  Int8RefExperts<S> i8;
  if (int8) i8 = Int8RefExperts<S>::of(p.Ws1, p.Ws2, p.Ws3, n, F, cfg)
                     .with_biases(p.bs1, p.bs2, p.bs3);
  // low-bit precisions (evaluation): every token is a row of every shared expert (M = T).
  const bool lowbit = low_bit(cfg.precision);
  LowbitRefExperts<S> lb;
  if (lowbit) lb = LowbitRefExperts<S>::of(p.Ws1, p.Ws2, p.Ws3, F, cfg).with_biases(p.bs1, p.bs2, p.bs3);
  std::vector<S> o8(static_cast<size_t>(int8 || lowbit ? Do : 0));
  for (int64_t t = 0; t < T; ++t) {
    const S* xg = x + t * d;
    for (int64_t i = 0; i < d; ++i) xq[i] = q(xg[i]);
    const S* xt = xq.data();
    std::fill(sum.begin(), sum.end(), S(0));
    for (int64_t s = 0; s < n; ++s) {
      if (int8 || lowbit) {
        if (int8)
          expert_row_int8_ref(o8.data(), xg, i8, s, cfg);
        else
          expert_row_lowbit_ref(o8.data(), xg, lb, s, cfg, T);
        for (int64_t c = 0; c < Do; ++c) sum[c] += o8[c];
        continue;
      }
      for (int64_t c = 0; c < W1w; ++c) {
        a1[c] = p.bs1.empty() ? S(0) : p.bs1[s * W1w + c];
        for (int64_t i = 0; i < d; ++i) a1[c] += xt[i] * q(p.Ws1[(s * d + i) * W1w + c]);
      }
      if (lin) {
        for (int64_t c = 0; c < Do; ++c) sum[c] += act_forward(Activation::relu, a1[c]);
        continue;
      }
      for (int64_t f = 0; f < F; ++f) {
        if (cfg.expert == ExpertKind::mlp) {
          hid[f] = q(act_forward(cfg.activation, a1[f]));
        } else {
          S a3 = p.bs3.empty() ? S(0) : p.bs3[s * F + f];
          for (int64_t i = 0; i < d; ++i) a3 += xt[i] * q(p.Ws3[(s * d + i) * F + f]);
          hid[f] = q(cfg.expert == ExpertKind::swiglu ? silu(a1[f]) * a3
                                                      : clamped_swiglu(a1[f], a3, alpha, limit));
        }
      }
      for (int64_t c = 0; c < Do; ++c) {
        S o = p.bs2.empty() ? S(0) : p.bs2[s * Do + c];
        for (int64_t f = 0; f < F; ++f) o += hid[f] * q(p.Ws2[(s * F + f) * Do + c]);
        sum[c] += o;
      }
    }
    S g = 1;
    if (cfg.shared_gate) {
      S z = 0;
      for (int64_t i = 0; i < d; ++i) z += xg[i] * p.w_shared_gate[i];
      g = S(1) / (S(1) + std::exp(-z));
    }
    for (int64_t c = 0; c < Do; ++c) y[t * Do + c] += g * sum[c];
  }
}

template <typename S>
void shared_backward_ref(S* dx, SharedRefParams<S>& gr, const S* dy, const S* x, int64_t T,
                         const SharedRefParams<S>& p, const MoEConfig& cfg) {
  const int64_t n = cfg.n_shared_experts, d = cfg.d_model, F = cfg.shared_hidden(),
                Do = cfg.out_dim();
  const bool lin = cfg.expert == ExpertKind::linear_relu;
  const int64_t W1w = lin ? Do : F;
  const S alpha = static_cast<S>(cfg.swiglu_alpha), limit = static_cast<S>(cfg.swiglu_limit);
  std::vector<S> a1(static_cast<size_t>(W1w)), a3(static_cast<size_t>(F)),
      hid(static_cast<size_t>(F)), dh(static_cast<size_t>(F)), da1(static_cast<size_t>(W1w)),
      da3(static_cast<size_t>(F)), sum(static_cast<size_t>(Do)), dsum(static_cast<size_t>(Do));
  const auto q = [bf = cfg.precision == Precision::bf16](S v) {
    return bf ? static_cast<S>(round_bf16(static_cast<float>(v))) : v;
  };
  std::vector<S> xq(static_cast<size_t>(d)), dsumq(static_cast<size_t>(Do));
  for (int64_t t = 0; t < T; ++t) {
    const S* xt = x + t * d;  // the gate's input; the products take xq
    const S* dyt = dy + t * Do;
    for (int64_t i = 0; i < d; ++i) xq[i] = q(xt[i]);
    S g = 1;
    if (cfg.shared_gate) {
      S z = 0;
      for (int64_t i = 0; i < d; ++i) z += xt[i] * p.w_shared_gate[i];
      g = S(1) / (S(1) + std::exp(-z));
      // ∂/∂z of g·(dy·sum): the ungated sum, recomputed by the forward of this token.
      std::fill(sum.begin(), sum.end(), S(0));
      MoEConfig ungated = cfg;
      ungated.shared_gate = false;
      shared_forward_ref<S>(sum.data(), xt, 1, p, ungated);
      S dz = 0;
      for (int64_t c = 0; c < Do; ++c) dz += dyt[c] * sum[c];
      dz *= g * (S(1) - g);
      for (int64_t i = 0; i < d; ++i) {
        gr.w_shared_gate[i] += xt[i] * dz;
        dx[t * d + i] += dz * p.w_shared_gate[i];
      }
    }
    for (int64_t c = 0; c < Do; ++c) {
      dsum[c] = g * dyt[c];
      dsumq[c] = q(dsum[c]);
    }
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t c = 0; c < W1w; ++c) {
        a1[c] = p.bs1.empty() ? S(0) : p.bs1[s * W1w + c];
        for (int64_t i = 0; i < d; ++i) a1[c] += xq[i] * q(p.Ws1[(s * d + i) * W1w + c]);
      }
      if (lin) {
        for (int64_t c = 0; c < Do; ++c) da1[c] = dsum[c] * act_grad(Activation::relu, a1[c]);
      } else {
        for (int64_t f = 0; f < F; ++f) {
          if (cfg.expert == ExpertKind::mlp) {
            hid[f] = q(act_forward(cfg.activation, a1[f]));
          } else {
            a3[f] = p.bs3.empty() ? S(0) : p.bs3[s * F + f];
            for (int64_t i = 0; i < d; ++i) a3[f] += xq[i] * q(p.Ws3[(s * d + i) * F + f]);
            hid[f] = q(cfg.expert == ExpertKind::swiglu
                           ? silu(a1[f]) * a3[f]
                           : clamped_swiglu(a1[f], a3[f], alpha, limit));
          }
          dh[f] = 0;
          for (int64_t c = 0; c < Do; ++c) {
            dh[f] += dsumq[c] * q(p.Ws2[(s * F + f) * Do + c]);
            gr.Ws2[(s * F + f) * Do + c] += hid[f] * dsumq[c];
          }
          if (cfg.expert == ExpertKind::mlp) {
            da1[f] = dh[f] * act_grad(cfg.activation, a1[f]);
          } else if (cfg.expert == ExpertKind::swiglu) {
            da1[f] = dh[f] * a3[f] * act_grad(Activation::silu, a1[f]);
            da3[f] = dh[f] * silu(a1[f]);
          } else {
            S d1, d3;
            clamped_swiglu_grad(&d1, &d3, a1[f], a3[f], alpha, limit);
            da1[f] = dh[f] * d1;
            da3[f] = dh[f] * d3;
          }
        }
        if (!gr.bs2.empty())
          for (int64_t c = 0; c < Do; ++c) gr.bs2[s * Do + c] += dsum[c];
      }
      for (int64_t c = 0; c < W1w; ++c) {
        if (!gr.bs1.empty()) gr.bs1[s * W1w + c] += da1[c];
        const S da1q = q(da1[c]);
        for (int64_t i = 0; i < d; ++i) {
          gr.Ws1[(s * d + i) * W1w + c] += xq[i] * da1q;
          dx[t * d + i] += da1q * q(p.Ws1[(s * d + i) * W1w + c]);
        }
      }
      if (gated_kind(cfg.expert))
        for (int64_t f = 0; f < F; ++f) {
          if (!gr.bs3.empty()) gr.bs3[s * F + f] += da3[f];
          const S da3q = q(da3[f]);
          for (int64_t i = 0; i < d; ++i) {
            gr.Ws3[(s * d + i) * F + f] += xq[i] * da3q;
            dx[t * d + i] += da3q * q(p.Ws3[(s * d + i) * F + f]);
          }
        }
    }
  }
}

}  // namespace moe::detail
