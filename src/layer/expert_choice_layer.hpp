// The layer's forward and backward under expert-choice routing (router "expert_choice"):
// router → expert-choice plan → gather → grouped expert GEMMs → per-token combine, and back.
// MoELayer calls these after router_forward when cfg.router_kind is expert_choice.
#pragma once
#include <cstdint>

#include "dispatch/expert_choice.hpp"
#include "experts/experts.hpp"
#include "experts/precision.hpp"
#include "layer/workspace.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

// What the layer lends the expert-choice path for one call.
struct ExpertChoiceLayer {
  const MoEConfig* cfg = nullptr;
  const RouterConfig* rcfg = nullptr;
  const ExpertShape* shape = nullptr;
  RouterParams router;
  ExpertWeights experts;
  ExpertPrecision* prec = nullptr;  // the experts' precision state (null: fp32)
  LayerBuffers b;  // carved for T with R = E·C rows (layer_workspace_floats)
  GroupedGemm* gg = nullptr;
};

// y is (T, d_out), x is (T, d). routing holds router_forward's output for x (its probs are
// the scores S); its ec_* fields, plan and stats are filled here.
void expert_choice_forward(float* y, ExpertChoicePlan& plan, RouterState& routing,
                           MoEStats& stats, const float* x, int64_t T,
                           const ExpertChoiceLayer& L);

// dy is (T, d_out); dx (T, d) is assigned; router and expert gradients accumulate.
void expert_choice_backward(float* dx, RouterGrads& rg, ExpertGrads& eg, const float* dy,
                            const ExpertChoicePlan& plan, const RouterState& routing,
                            const ExpertChoiceLayer& L);

}  // namespace moe::detail
