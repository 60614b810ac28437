#include "layer/expert_choice_layer.hpp"

#include <algorithm>

#include "common/check.hpp"
#include "losses/losses.hpp"
#include "router/expert_choice.hpp"

namespace moe::detail {

void expert_choice_forward(float* y, ExpertChoicePlan& plan, RouterState& routing,
                           MoEStats& st, const float* x, int64_t T, const ExpertChoiceLayer& L) {
  const MoEConfig& cfg = *L.cfg;
  const LayerBuffers& b = L.b;
  const int64_t d = cfg.d_model, E = cfg.n_experts, Do = cfg.out_dim();
  const int64_t C = expert_choice_capacity(cfg, T);
  MOE_REQUIRE(E * C <= int64_t{0x7fffffff}, "T: too many tokens for one batch under expert ",
              "choice (n_experts * capacity = ", E * C, "), got ", T);
  build_expert_choice_plan(plan, routing.probs.data(), T, E, C);
  const int64_t R = plan.R;

  std::copy(x, x + T * d, b.x);
  const int32_t* tok = plan.row_token.data();
#pragma omp parallel for schedule(static) if (R * d >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    const float* src = x + int64_t{tok[r]} * d;
    std::copy(src, src + d, b.xg + r * d);
  }

  ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  experts_forward(acts, b.xg, L.experts, plan.offsets.data(), *L.shape, *L.gg, L.prec);

  // Combine: per token, its rows in expert order.
  const int32_t* toff = plan.tok_offsets.data();
  const int32_t* trows = plan.tok_rows.data();
  const float* gate = plan.row_gate.data();
  const float* out = b.out;
  const bool residual = cfg.residual;
#pragma omp parallel for schedule(static) if ((T + R) * Do >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* yt = y + t * Do;
    if (residual)
      std::copy(x + t * d, x + (t + 1) * d, yt);
    else
      std::fill(yt, yt + Do, 0.0f);
    for (int32_t i = toff[t]; i < toff[t + 1]; ++i) {
      const int64_t r = trows[i];
      const float g = gate[r];
      const float* o = out + r * Do;
      for (int64_t c = 0; c < Do; ++c) yt[c] += g * o[c];
    }
  }

  routing.ec_capacity = C;
  routing.ec_tokens.assign(plan.row_token.begin(), plan.row_token.end());
  routing.ec_gates.assign(plan.row_gate.begin(), plan.row_gate.end());

  st.tokens = T;
  st.capacity = C;
  st.load_before.assign(static_cast<size_t>(E), C);
  st.load_after.assign(static_cast<size_t>(E), C);
  st.dropped_assignments = 0;
  st.dropped_tokens = plan.dropped_tokens;
  st.experts_evaluated = C > 0 ? E : 0;
  st.experts_per_token = plan.experts_per_token;
  st.aux_loss = 0.0;  // balanced by construction: no balancing loss (docs/routing.md)
  st.z_loss = cfg.z_alpha > 0.0f
                  ? router_z_loss_t<float>(nullptr, routing.logits.data(), T, E, cfg.z_alpha)
                  : 0.0;
}

void expert_choice_backward(float* dx, RouterGrads& rg, ExpertGrads& eg, const float* dy,
                            const ExpertChoicePlan& plan, const RouterState& routing,
                            const ExpertChoiceLayer& L) {
  const MoEConfig& cfg = *L.cfg;
  const LayerBuffers& b = L.b;
  const int64_t T = plan.T, E = plan.E, C = plan.C, R = plan.R, d = cfg.d_model,
                Do = cfg.out_dim();
  const int32_t* tok = plan.row_token.data();
  const float* gate = plan.row_gate.data();
  const float* out = b.out;

  // y_t = Σ_r S[t, e(r)]·out_r: ∂L/∂S[t, e] = dy_t·out_r on the chosen (t, e), 0 elsewhere
  // (each pair is at most one row); ∂L/∂out_r = S[t, e]·dy_t.
  float* dS = b.dprobs;
  std::fill(dS, dS + T * E, 0.0f);
#pragma omp parallel for schedule(static) if (R * Do >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = tok[r], e = r / C;
    const float* dyt = dy + t * Do;
    const float* o = out + r * Do;
    float acc = 0.0f;
    for (int64_t c = 0; c < Do; ++c) acc += dyt[c] * o[c];
    dS[t * E + e] = acc;
    const float g = gate[r];
    for (int64_t c = 0; c < Do; ++c) b.dout[r * Do + c] = g * dyt[c];
  }

  ExpertActs acts{b.a1, b.a3, b.hid, b.out};
  ExpertScratch scr{b.dh, b.da3};
  experts_backward(b.dxg, eg, b.dout, scr, acts, b.xg, L.experts, plan.offsets.data(), *L.shape,
                   *L.gg, L.prec);

  // Router: S = softmax(H), so dS enters exactly as the balancing loss's ∂L/∂probs would;
  // the selection itself is piecewise constant. z-loss through h. dx is assigned here.
  const float* dlogits = nullptr;
  if (cfg.z_alpha > 0.0f) {
    router_z_loss_t<float>(b.dlogits, routing.logits.data(), T, E, cfg.z_alpha);
    dlogits = b.dlogits;
  }
  router_backward(dx, rg, nullptr, dS, dlogits, routing, b.x, L.router, *L.rcfg);

  // Experts' dx back per token, in expert order, plus the residual path.
  const int32_t* toff = plan.tok_offsets.data();
  const int32_t* trows = plan.tok_rows.data();
  const bool residual = cfg.residual;
#pragma omp parallel for schedule(static) if ((T + R) * d >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* dxt = dx + t * d;
    for (int32_t i = toff[t]; i < toff[t + 1]; ++i) {
      const float* src = b.dxg + int64_t{trows[i]} * d;
      for (int64_t c = 0; c < d; ++c) dxt[c] += src[c];
    }
    if (residual)
      for (int64_t c = 0; c < d; ++c) dxt[c] += dy[t * Do + c];
  }
}

}  // namespace moe::detail
