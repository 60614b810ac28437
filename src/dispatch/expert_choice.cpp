#include "dispatch/expert_choice.hpp"

#include <algorithm>

#include "common/check.hpp"
#include "router/expert_choice.hpp"

namespace moe::detail {

void build_expert_choice_plan(ExpertChoicePlan& plan, const float* scores, int64_t T, int64_t E,
                              int64_t C) {
  MOE_ASSERT(C >= 0 && C <= T && E * C <= int64_t{0x7fffffff});
  const int64_t R = E * C;
  plan.T = T;
  plan.E = E;
  plan.C = C;
  plan.R = R;
  plan.row_token.resize(static_cast<size_t>(R));
  plan.row_gate.resize(static_cast<size_t>(R));
  plan.tok_rows.resize(static_cast<size_t>(R));
  expert_choice_select(plan.row_token.data(), plan.row_gate.data(), plan.scratch, scores, T, E,
                       C);
  plan.offsets.resize(static_cast<size_t>(E + 1));
  for (int64_t e = 0; e <= E; ++e) plan.offsets[e] = e * C;

  // Counting sort of the rows by token; walking rows in order keeps each token's rows in
  // expert order.
  plan.tok_offsets.assign(static_cast<size_t>(T + 1), 0);
  for (int64_t r = 0; r < R; ++r) ++plan.tok_offsets[plan.row_token[r] + 1];
  for (int64_t t = 0; t < T; ++t) plan.tok_offsets[t + 1] += plan.tok_offsets[t];
  plan.scratch.resize(static_cast<size_t>(std::max<int64_t>(T, 1)));
  int32_t* cursor = plan.scratch.data();
  std::copy(plan.tok_offsets.begin(), plan.tok_offsets.begin() + T, cursor);
  for (int64_t r = 0; r < R; ++r) plan.tok_rows[cursor[plan.row_token[r]]++] = static_cast<int32_t>(r);

  plan.experts_per_token.assign(static_cast<size_t>(E + 1), 0);
  for (int64_t t = 0; t < T; ++t) ++plan.experts_per_token[plan.tok_offsets[t + 1] - plan.tok_offsets[t]];
  plan.dropped_tokens = plan.experts_per_token[0];
}

}  // namespace moe::detail
