// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
// the experts choose tokens instead of tokens choosing experts. With scores S = softmax(H)
// (T, E), expert e takes the C tokens of largest S[:, e]; a token may be chosen by any
// number of experts, 0 included. docs/routing.md §Expert-choice routing, docs/math.md.
#pragma once
#include <cstdint>
#include <vector>

#include "moe/layer.hpp"

namespace moe::detail {

// C = min(T, ceil(k·T·cf/E)), cf = capacity_factor or 1.0 when unset (k is then the average
// number of experts per token). The rounding is that of MoEConfig::capacity.
int64_t expert_choice_capacity(const MoEConfig& cfg, int64_t T);

// Refuses, by name, options that have no meaning for expert choice (called by
// MoEConfig::validate_router_family when router_kind is expert_choice).
void validate_expert_choice(const MoEConfig& cfg);

// tokens (E, C) and gates (E, C) are assigned: row e holds expert e's C tokens, best first
// (largest S[t, e]; equal scores go to the lower token index), and gates[e, c] =
// S[tokens[e, c], e]. scores is (T, E) and finite; 0 <= C <= T. scratch is resized to E·T.
// Experts are independent and the order is total, so the result does not depend on threads.
void expert_choice_select(int32_t* tokens, float* gates, std::vector<int32_t>& scratch,
                          const float* scores, int64_t T, int64_t E, int64_t C);

// Plain loops (a stable sort of every column), the test oracle of expert_choice_select.
void expert_choice_select_ref(int32_t* tokens, float* gates, const float* scores, int64_t T,
                              int64_t E, int64_t C);

}  // namespace moe::detail
