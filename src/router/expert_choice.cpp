#include "router/expert_choice.hpp"

#include <algorithm>
#include <numeric>

#include "common/check.hpp"
#include "common/parallel.hpp"

namespace moe::detail {

int64_t expert_choice_capacity(const MoEConfig& cfg, int64_t T) {
  if (T <= 0) return 0;
  MoEConfig c = cfg;
  if (!c.capacity_factor) c.capacity_factor = 1.0;
  return std::min(c.capacity(T), T);
}

void validate_expert_choice(const MoEConfig& c) {
  if (c.router_kind != RouterKind::expert_choice) return;
  auto refuse = [](bool used, const char* what, const char* why) {
    MOE_REQUIRE(!used, what, ": not supported with router 'expert_choice' (", why, ")");
  };
  refuse(c.drop_policy != DropPolicy::position, "drop_policy",
         "experts choose their C tokens themselves; there is no drop policy");
  refuse(c.scaling_factor != 1.0f, "scaling_factor", "gates are the softmax scores");
  refuse(c.aux_alpha > 0.0f && c.aux_loss_kind != AuxLossKind::switch_lb &&
             c.aux_loss_kind != AuxLossKind::none,
         "aux_loss", "expert choice is balanced by construction; use 'switch' (reported as 0) "
         "or 'none'");
  refuse(c.bias_update_rate > 0.0f, "bias_update_rate", "balanced by construction");
  refuse(c.selection_bias, "selection_bias", "balanced by construction");
  refuse(c.n_groups > 1, "n_groups", "token-choice option");
  refuse(c.second_expert_policy != SecondExpertPolicy::all, "second_expert_policy",
         "token-choice option");
  refuse(c.n_shared_experts > 0, "n_shared_experts", "not combined with expert choice yet");
  refuse(c.jitter > 0.0f, "jitter", "not combined with expert choice yet");
  refuse(c.expert == ExpertKind::clamped_swiglu, "expert 'clamped_swiglu'",
         "not combined with expert choice yet");
}

void expert_choice_select(int32_t* tokens, float* gates, std::vector<int32_t>& scratch,
                          const float* S, int64_t T, int64_t E, int64_t C) {
  MOE_ASSERT(C >= 0 && C <= T);
  if (C == 0 || E == 0) return;
  scratch.resize(static_cast<size_t>(E * T));
  int32_t* base = scratch.data();
#pragma omp parallel for schedule(static) if (E * T >= kParallelMin)
  for (int64_t e = 0; e < E; ++e) {
    int32_t* ord = base + e * T;
    std::iota(ord, ord + T, 0);
    // A strict total order: larger score first, then the lower token.
    auto better = [S, E, e](int32_t a, int32_t b) {
      const float sa = S[int64_t{a} * E + e], sb = S[int64_t{b} * E + e];
      return sa > sb || (sa == sb && a < b);
    };
    if (C < T) std::nth_element(ord, ord + (C - 1), ord + T, better);
    std::sort(ord, ord + C, better);
    for (int64_t c = 0; c < C; ++c) {
      tokens[e * C + c] = ord[c];
      gates[e * C + c] = S[int64_t{ord[c]} * E + e];
    }
  }
}

void expert_choice_select_ref(int32_t* tokens, float* gates, const float* S, int64_t T,
                              int64_t E, int64_t C) {
  std::vector<int32_t> ord(static_cast<size_t>(T));
  for (int64_t e = 0; e < E; ++e) {
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(),
                     [&](int32_t a, int32_t b) { return S[a * E + e] > S[b * E + e]; });
    for (int64_t c = 0; c < C; ++c) {
      tokens[e * C + c] = ord[c];
      gates[e * C + c] = S[ord[c] * E + e];
    }
  }
}

}  // namespace moe::detail
