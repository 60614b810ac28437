// Dispatch as explicit index maps (STYLE.md item 4), shared by the fast layer and its
// reference twin. An assignment is the pair (token t, rank j), numbered a = t·k + j. The plan
// decides which assignments each expert keeps under its capacity C, and lays the kept ones
// out as dest slots grouped by expert:
//
//   src_to_dest[a]   the dest slot of assignment a, or -1 when it was dropped
//   dest_to_src[s]   the assignment held by dest slot s
//   offsets[e]       expert e owns dest slots [offsets[e], offsets[e+1])
//
// Within an expert, slots are in rank-major, token order (all first choices in token order,
// then all second choices, ...), whatever the drop policy. Everything here is integer work
// in a fixed order, so the plan is identical in float and double and on any thread count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/check.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

struct CapacityPlan {
  int64_t T = 0, k = 0, E = 0;
  int64_t C = -1;                    // capacity per expert, -1: dropless
  int64_t n_kept = 0;                // kept assignments = dest slots in use
  int64_t dropped_tokens = 0;        // tokens with no kept assignment
  std::vector<int64_t> load_before;  // (E) assignments routed to each expert
  std::vector<int64_t> load_after;   // (E) assignments kept
  std::vector<int64_t> offsets;      // (E + 1)
  std::vector<int32_t> src_to_dest;  // (T·k)
  std::vector<int32_t> dest_to_src;  // (n_kept) — sized T·k, the first n_kept are valid
  std::vector<int32_t> scratch;      // (T·k) candidates grouped by expert (probs policy)
  std::vector<int64_t> cursor;       // (E)
};

// indices (T, k) and weights (T, k) as the router returns them. weights are read only by
// DropPolicy::probs, which keeps the C assignments of largest weight (ties to the lower
// token index). Vectors are resized, never shrunk, so a plan reused for the same T does not
// allocate.
template <typename S>
void build_capacity_plan(CapacityPlan& plan, const int32_t* indices, const S* weights, int64_t T,
                         int64_t k, int64_t E, int64_t C, DropPolicy policy) {
  MOE_ASSERT(T * k <= int64_t{0x7fffffff});
  const int64_t A = T * k;
  plan.T = T;
  plan.k = k;
  plan.E = E;
  plan.C = C;
  plan.load_before.assign(static_cast<size_t>(E), 0);
  plan.load_after.assign(static_cast<size_t>(E), 0);
  plan.offsets.assign(static_cast<size_t>(E + 1), 0);
  plan.cursor.assign(static_cast<size_t>(E), 0);
  plan.src_to_dest.resize(static_cast<size_t>(A));
  plan.dest_to_src.resize(static_cast<size_t>(A));
  int32_t* s2d = plan.src_to_dest.data();

  for (int64_t a = 0; a < A; ++a) {
    MOE_ASSERT(indices[a] >= 0 && indices[a] < E);
    ++plan.load_before[indices[a]];
  }

  // Pass 1: mark kept assignments (s2d = 0 kept, -1 dropped).
  const bool dropless = C < 0;
  if (dropless || policy == DropPolicy::position) {
    // Rank-major then token order: an expert's first C arrivals in that order stay.
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t a = t * k + j;
        const int64_t e = indices[a];
        s2d[a] = dropless || plan.cursor[e]++ < C ? 0 : -1;
      }
  } else {
    // Counting sort of the assignments by expert, then per over-full expert the C of
    // largest weight.
    plan.scratch.resize(static_cast<size_t>(A));
    int32_t* cand = plan.scratch.data();
    for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.load_before[e];
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t a = t * k + j;
        const int64_t e = indices[a];
        cand[plan.offsets[e] + plan.cursor[e]++] = static_cast<int32_t>(a);
        s2d[a] = 0;
      }
    for (int64_t e = 0; e < E; ++e) {
      if (plan.load_before[e] <= C) continue;
      int32_t* lo = cand + plan.offsets[e];
      int32_t* hi = lo + plan.load_before[e];
      // A total order (a token reaches an expert at most once), so the sort is deterministic.
      std::sort(lo, hi, [&](int32_t a, int32_t b) {
        if (weights[a] != weights[b]) return weights[a] > weights[b];
        return a < b;  // a = t·k + j: lower a is the lower token
      });
      for (int32_t* p = lo + C; p < hi; ++p) s2d[*p] = -1;
    }
  }
  std::fill(plan.offsets.begin(), plan.offsets.end(), 0);
  std::fill(plan.cursor.begin(), plan.cursor.end(), 0);

  // Pass 2: dest slots, grouped by expert, rank-major then token order within an expert.
  for (int64_t a = 0; a < A; ++a)
    if (s2d[a] == 0) ++plan.load_after[indices[a]];
  for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.load_after[e];
  plan.n_kept = plan.offsets[E];
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t a = t * k + j;
      if (s2d[a] < 0) continue;
      const int64_t e = indices[a];
      const int64_t s = plan.offsets[e] + plan.cursor[e]++;
      s2d[a] = static_cast<int32_t>(s);
      plan.dest_to_src[s] = static_cast<int32_t>(a);
    }

  plan.dropped_tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t j = 0; j < k; ++j) any = any || s2d[t * k + j] >= 0;
    plan.dropped_tokens += any ? 0 : 1;
  }
}

}  // namespace moe::detail
