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
#include "dispatch/dispatch_random.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

struct CapacityPlan {
  int64_t T = 0, k = 0, E = 0;
  int64_t C = -1;                    // capacity per expert, -1: dropless
  int64_t n_kept = 0;                // kept assignments = dest slots in use
  int64_t dropped_tokens = 0;        // tokens with no kept assignment
  int64_t second_skipped = 0;        // 2nd choices not dispatched (second_expert_policy random)
  std::vector<int64_t> load_before;  // (E) assignments routed to each expert
  std::vector<int64_t> load_after;   // (E) assignments kept
  std::vector<int64_t> offsets;      // (E + 1)
  std::vector<int32_t> src_to_dest;  // (T·k)
  std::vector<int32_t> dest_to_src;  // (n_kept) — sized T·k, the first n_kept are valid
  std::vector<int32_t> scratch;      // (T·k) candidates grouped by expert, or a token order
  std::vector<uint32_t> keys;        // (T·k) random priorities (random policy)
  std::vector<int64_t> cursor;       // (E)
};

// What decides the drops besides the routing itself. seed, step and token_offset key the
// random draws of drop_policy "random" and second_expert_policy "random"
// (dispatch/dispatch_random.hpp); the other policies ignore them.
struct PlanOptions {
  int64_t C = -1;  // capacity per expert, -1: dropless
  DropPolicy policy = DropPolicy::position;
  SecondExpertPolicy second = SecondExpertPolicy::all;
  uint64_t seed = 0, step = 0;
  int64_t token_offset = 0;  // global index of token 0
};

// indices (T, k) and weights (T, k) as the router returns them. The policies, for an expert
// that receives more than C (eligible) assignments:
//   position  the first C in rank-major, token order (GShard);
//   probs     the C of largest weight (ties to the lower token);
//   random    the C of largest random priority, a 32-bit Philox word per (global token, rank)
//             (ties to the lower token) — DeepSpeed's random token selection;
//   priority  the first C in rank-major order with tokens sorted by their top-1 weight,
//             largest first (ties to the lower token) — V-MoE batch-prioritised routing.
// Before capacity, second_expert_policy random (k = 2, GShard) dispatches the second choice
// of token t only when u_t < 2·w2 / (w1 + w2), u_t uniform in [0, 1) from Philox; a second
// choice not dispatched is dropped (it takes no slot). Vectors are resized, never shrunk, so
// a plan reused for the same T does not allocate.
template <typename S>
void build_capacity_plan(CapacityPlan& plan, const int32_t* indices, const S* weights, int64_t T,
                         int64_t k, int64_t E, const PlanOptions& opt) {
  MOE_ASSERT(T * k <= int64_t{0x7fffffff});
  const int64_t A = T * k;
  const int64_t C = opt.C;
  const DropPolicy policy = opt.policy;
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
    s2d[a] = 0;
  }

  // Pass 0: GShard's random second expert (s2d = 0 eligible, -1 dropped).
  plan.second_skipped = 0;
  if (opt.second == SecondExpertPolicy::random && k == 2) {
    for (int64_t t = 0; t < T; ++t) {
      const double w1 = static_cast<double>(weights[2 * t]);
      const double w2 = static_cast<double>(weights[2 * t + 1]);
      const double p = w1 + w2 > 0.0 ? 2.0 * w2 / (w1 + w2) : 0.0;
      const double u = dispatch_uniform(opt.seed, opt.step, opt.token_offset + t,
                                        DispatchStream::second_expert, 0);
      if (!(u < p)) {
        s2d[2 * t + 1] = -1;
        ++plan.second_skipped;
      }
    }
  }

  // Pass 1: mark the kept assignments among the eligible ones.
  const bool dropless = C < 0;
  if (dropless) {
    // Everything eligible stays.
  } else if (policy == DropPolicy::position || policy == DropPolicy::priority) {
    // Rank-major; tokens in index order (position) or by top-1 weight (priority). An
    // expert's first C arrivals in that order stay.
    plan.scratch.resize(static_cast<size_t>(std::max<int64_t>(A, 1)));
    int32_t* order = plan.scratch.data();
    for (int64_t t = 0; t < T; ++t) order[t] = static_cast<int32_t>(t);
    if (policy == DropPolicy::priority)
      std::stable_sort(order, order + T, [&](int32_t a, int32_t b) {
        return weights[int64_t{a} * k] > weights[int64_t{b} * k];
      });
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t a = int64_t{order[i]} * k + j;
        if (s2d[a] < 0) continue;
        const int64_t e = indices[a];
        if (plan.cursor[e]++ >= C) s2d[a] = -1;
      }
  } else {
    // Counting sort of the eligible assignments by expert, then per over-full expert the C
    // with the largest key (weight or random priority).
    plan.scratch.resize(static_cast<size_t>(A));
    int32_t* cand = plan.scratch.data();
    std::vector<int64_t>& n_elig = plan.load_after;  // reset before pass 2
    for (int64_t a = 0; a < A; ++a)
      if (s2d[a] == 0) ++n_elig[indices[a]];
    for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + n_elig[e];
    for (int64_t a = 0; a < A; ++a) {
      if (s2d[a] < 0) continue;
      const int64_t e = indices[a];
      cand[plan.offsets[e] + plan.cursor[e]++] = static_cast<int32_t>(a);
    }
    const bool random = policy == DropPolicy::random;
    if (random) plan.keys.resize(static_cast<size_t>(A));
    uint32_t* key = plan.keys.data();
    for (int64_t e = 0; e < E; ++e) {
      if (n_elig[e] <= C) continue;
      int32_t* lo = cand + plan.offsets[e];
      int32_t* hi = lo + n_elig[e];
      // A total order (a token reaches an expert at most once), so the sort is deterministic.
      if (random) {
        for (int32_t* q = lo; q < hi; ++q)
          key[*q] = dispatch_bits(opt.seed, opt.step, opt.token_offset + *q / k,
                                  DispatchStream::drop_priority, *q % k);
        std::sort(lo, hi, [&](int32_t a, int32_t b) {
          if (key[a] != key[b]) return key[a] > key[b];
          return a < b;
        });
      } else {
        std::sort(lo, hi, [&](int32_t a, int32_t b) {
          if (weights[a] != weights[b]) return weights[a] > weights[b];
          return a < b;  // a = t·k + j: lower a is the lower token
        });
      }
      for (int32_t* q = lo + C; q < hi; ++q) s2d[*q] = -1;
    }
    std::fill(plan.load_after.begin(), plan.load_after.end(), 0);
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

// The position / probs policies with every second choice dispatched (no random draws).
template <typename S>
void build_capacity_plan(CapacityPlan& plan, const int32_t* indices, const S* weights, int64_t T,
                         int64_t k, int64_t E, int64_t C, DropPolicy policy) {
  PlanOptions opt;
  opt.C = C;
  opt.policy = policy;
  build_capacity_plan(plan, indices, weights, T, k, E, opt);
}

}  // namespace moe::detail
