#include "layer/shared_experts.hpp"

#include <algorithm>
#include <cmath>

#include "common/check.hpp"
#include "common/philox.hpp"

namespace moe::detail {

void shared_parameter_specs(std::vector<ParamSpec>& s, const MoEConfig& cfg) {
  const int64_t n = cfg.n_shared_experts, d = cfg.d_model, F = cfg.shared_hidden(),
                Do = cfg.out_dim();
  if (n <= 0) return;
  switch (cfg.expert) {
    case ExpertKind::linear_relu:
      s.push_back({"Ws1", {n, d, Do}});
      if (cfg.expert_bias) s.push_back({"bs1", {n, Do}});
      break;
    case ExpertKind::mlp:
      s.push_back({"Ws1", {n, d, F}});
      if (cfg.expert_bias) s.push_back({"bs1", {n, F}});
      s.push_back({"Ws2", {n, F, Do}});
      if (cfg.expert_bias) s.push_back({"bs2", {n, Do}});
      break;
    case ExpertKind::swiglu:
      s.push_back({"Ws1", {n, d, F}});
      s.push_back({"Ws2", {n, F, Do}});
      s.push_back({"Ws3", {n, d, F}});
      break;
    case ExpertKind::clamped_swiglu:
      s.push_back({"Ws1", {n, d, F}});
      if (cfg.expert_bias) s.push_back({"bs1", {n, F}});
      s.push_back({"Ws2", {n, F, Do}});
      if (cfg.expert_bias) s.push_back({"bs2", {n, Do}});
      s.push_back({"Ws3", {n, d, F}});
      if (cfg.expert_bias) s.push_back({"bs3", {n, F}});
      break;
  }
  if (cfg.shared_gate) s.push_back({"w_shared_gate", {d}});
}

bool init_shared_parameter(Tensor& p, const std::string& name, const MoEConfig& cfg) {
  const double d = static_cast<double>(cfg.d_model), F = static_cast<double>(cfg.shared_hidden());
  double scale = 0.0;
  uint32_t stream = 0;
  if (name == "Ws1") {
    scale = 1.0 / std::sqrt(d);
    stream = 6;
  } else if (name == "Ws2") {
    scale = 1.0 / std::sqrt(cfg.expert == ExpertKind::linear_relu ? d : F);
    stream = 7;
  } else if (name == "Ws3") {
    scale = 1.0 / std::sqrt(d);
    stream = 8;
  } else if (name != "bs1" && name != "bs2" && name != "bs3" && name != "w_shared_gate") {
    return false;
  }
  std::fill(p.data.begin(), p.data.end(), 0.0f);
  if (stream == 0) return true;
  // N(0, 1/fan_in) from Philox, salted and on its own streams like layer/init.cpp.
  constexpr uint64_t kSalt = 0x5DEECE66D2545F49ull;
  float z[4];
  const int64_t n = p.numel();
  for (int64_t i = 0; i < n; i += 4) {
    philox_normal4(z, cfg.seed ^ kSalt, stream, i / 4, 0);
    for (int64_t j = 0; j < 4 && i + j < n; ++j)
      p.data[i + j] = static_cast<float>(scale * static_cast<double>(z[j]));
  }
  return true;
}

namespace {

ExpertShape shared_shape(const MoEConfig& cfg) {
  ExpertShape s = ExpertShape::of(cfg);
  s.E = cfg.n_shared_experts;
  s.F = cfg.shared_hidden();
  return s;
}

}  // namespace

void SharedExperts::forward(float* y, const float* x, int64_t T, const SharedWeights& w,
                            const MoEConfig& cfg) {
  const int64_t n = cfg.n_shared_experts, d = cfg.d_model, F = cfg.shared_hidden(),
                Do = cfg.out_dim();
  T_ = T;
  if (n <= 0 || T == 0) return;
  const int64_t R = n * T;  // every token to every shared expert
  const int64_t W1w = cfg.expert == ExpertKind::linear_relu ? Do : F;
  xg_.resize(static_cast<size_t>(R * d));
  a1_.resize(static_cast<size_t>(R * W1w));
  a3_.resize(gated_kind(cfg.expert) ? static_cast<size_t>(R * F) : 0);
  hid_.resize(cfg.expert == ExpertKind::linear_relu ? 0 : static_cast<size_t>(R * F));
  out_.resize(static_cast<size_t>(R * Do));
  sum_.resize(static_cast<size_t>(T * Do));
  gate_.assign(static_cast<size_t>(T), 1.0f);
  offsets_.resize(static_cast<size_t>(n + 1));
  for (int64_t s = 0; s <= n; ++s) offsets_[s] = s * T;
  for (int64_t s = 0; s < n; ++s) std::copy(x, x + T * d, xg_.data() + s * T * d);

  ExpertActs acts{a1_.data(), a3_.empty() ? nullptr : a3_.data(),
                  hid_.empty() ? nullptr : hid_.data(), out_.data()};
  ExpertWeights ew{w.W1, w.b1, w.W2, w.b2, w.W3, w.b3};
  experts_forward(acts, xg_.data(), ew, offsets_.data(), shared_shape(cfg), gg_, &prec_);

  const float* out = out_.data();
  float* sum = sum_.data();
  float* gate = gate_.data();
  const bool gated = cfg.shared_gate;
#pragma omp parallel for schedule(static) if (T * n * Do >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* st = sum + t * Do;
    std::fill(st, st + Do, 0.0f);
    for (int64_t s = 0; s < n; ++s) {
      const float* o = out + (s * T + t) * Do;
      for (int64_t c = 0; c < Do; ++c) st[c] += o[c];
    }
    if (gated) {
      double z = 0.0;
      for (int64_t i = 0; i < d; ++i) z += static_cast<double>(x[t * d + i]) * w.w_gate[i];
      gate[t] = static_cast<float>(1.0 / (1.0 + std::exp(-z)));
    }
    for (int64_t c = 0; c < Do; ++c) y[t * Do + c] += gate[t] * st[c];
  }
}

void SharedExperts::backward(float* dx, SharedGrads& g, const float* dy, const SharedWeights& w,
                             const MoEConfig& cfg) {
  const int64_t n = cfg.n_shared_experts, d = cfg.d_model, F = cfg.shared_hidden(),
                Do = cfg.out_dim();
  const int64_t T = T_;
  if (n <= 0 || T == 0) return;
  const int64_t R = n * T;
  dout_.resize(static_cast<size_t>(R * Do));
  dh_.resize(cfg.expert == ExpertKind::linear_relu ? 0 : static_cast<size_t>(R * F));
  da3_.resize(gated_kind(cfg.expert) ? static_cast<size_t>(R * F) : 0);
  dxg_.resize(static_cast<size_t>(R * d));
  const float* x = xg_.data();  // the first T rows are x
  const float* gate = gate_.data();
  const float* sum = sum_.data();
  float* dout = dout_.data();
  const bool gated = cfg.shared_gate;
  // The gate: y_t += g_t·sum_t, g_t = sigmoid(z_t), z_t = x_t·w: ∂/∂z_t = g(1-g)·(dy_t·sum_t).
  if (gated) {
    for (int64_t t = 0; t < T; ++t) {  // serial over tokens: a fixed order for dw_gate
      double dz = 0.0;
      for (int64_t c = 0; c < Do; ++c)
        dz += static_cast<double>(dy[t * Do + c]) * static_cast<double>(sum[t * Do + c]);
      const float dzf = static_cast<float>(dz * gate[t] * (1.0 - gate[t]));
      for (int64_t i = 0; i < d; ++i) {
        g.dw_gate[i] += x[t * d + i] * dzf;
        dx[t * d + i] += dzf * w.w_gate[i];
      }
    }
  }
#pragma omp parallel for schedule(static) if (R * Do >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = r % T;
    for (int64_t c = 0; c < Do; ++c) dout[r * Do + c] = gate[t] * dy[t * Do + c];
  }
  ExpertActs acts{a1_.data(), a3_.empty() ? nullptr : a3_.data(),
                  hid_.empty() ? nullptr : hid_.data(), out_.data()};
  ExpertScratch scr{dh_.empty() ? nullptr : dh_.data(), da3_.empty() ? nullptr : da3_.data()};
  ExpertWeights ew{w.W1, w.b1, w.W2, w.b2, w.W3, w.b3};
  ExpertGrads eg{g.dW1, g.db1, g.dW2, g.db2, g.dW3, g.db3};
  experts_backward(dxg_.data(), eg, dout, scr, acts, xg_.data(), ew, offsets_.data(),
                   shared_shape(cfg), gg_, &prec_);
  const float* dxg = dxg_.data();
#pragma omp parallel for schedule(static) if (T * n * d >= kParallelMin)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < n; ++s)
      for (int64_t i = 0; i < d; ++i) dx[t * d + i] += dxg[(s * T + t) * d + i];
}

}  // namespace moe::detail
