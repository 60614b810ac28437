// The dispatch plan of expert-choice routing (router/expert_choice.hpp). Where the capacity
// plan maps (token, rank) assignments, here every expert owns exactly C rows, each a token and
// a gate:
//
//   row r = e·C + c     the c-th best token of expert e (rows grouped by expert, as the
//                       grouped-GEMM experts want: offsets[e] = e·C)
//   row_token[r]        its token, row_gate[r] = S[token, e]
//   tok_rows[tok_offsets[t] .. tok_offsets[t+1])   the rows of token t in expert order
//
// The token→rows direction makes combine a per-token sum in expert order: no atomics, and the
// same bits for any thread count. Everything but the selection is integer work in a fixed
// order.
#pragma once
#include <cstdint>
#include <vector>

namespace moe::detail {

struct ExpertChoicePlan {
  int64_t T = 0, E = 0, C = 0, R = 0;   // R = E·C rows
  std::vector<int32_t> row_token;       // (R)
  std::vector<float> row_gate;          // (R)
  std::vector<int64_t> offsets;         // (E + 1)
  std::vector<int32_t> tok_offsets;     // (T + 1)
  std::vector<int32_t> tok_rows;        // (R)
  std::vector<int64_t> experts_per_token;  // (E + 1) tokens chosen by 0, 1, …, E experts
  int64_t dropped_tokens = 0;           // tokens no expert chose (= experts_per_token[0])
  std::vector<int32_t> scratch;         // selection scratch (E·T), then a cursor (T)
};

// scores is S (T, E); 0 <= C <= T and E·C < 2^31. Vectors are resized, never shrunk.
void build_expert_choice_plan(ExpertChoicePlan& plan, const float* scores, int64_t T, int64_t E,
                              int64_t C);

}  // namespace moe::detail
