// The capacity plan: both index maps agree, slots are grouped by expert in rank-major token
// order, the two drop policies keep what SPEC §3 says, and stats add up.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "dispatch/capacity_plan.hpp"
#include "test_layer_util.hpp"

using moe::detail::CapacityPlan;
using moe::detail::build_capacity_plan;

namespace {

// Invariants every plan must satisfy.
void check_plan(const CapacityPlan& p, const std::vector<int32_t>& idx) {
  const int64_t A = p.T * p.k;
  int64_t kept = 0;
  for (int64_t a = 0; a < A; ++a) {
    const int32_t s = p.src_to_dest[a];
    if (s < 0) continue;
    ++kept;
    ASSERT_EQ(p.dest_to_src[s], a);
    const int64_t e = idx[a];
    ASSERT_GE(s, p.offsets[e]);
    ASSERT_LT(s, p.offsets[e + 1]);
  }
  ASSERT_EQ(kept, p.n_kept);
  for (int64_t e = 0; e < p.E; ++e) {
    ASSERT_EQ(p.offsets[e + 1] - p.offsets[e], p.load_after[e]);
    ASSERT_LE(p.load_after[e], p.load_before[e]);
    if (p.C >= 0) {
      ASSERT_EQ(p.load_after[e], std::min(p.load_before[e], p.C));
    }
    // Within an expert: rank-major, then token order.
    for (int64_t s = p.offsets[e] + 1; s < p.offsets[e + 1]; ++s) {
      const int32_t a0 = p.dest_to_src[s - 1], a1 = p.dest_to_src[s];
      const int64_t j0 = a0 % p.k, j1 = a1 % p.k;
      ASSERT_TRUE(j0 < j1 || (j0 == j1 && a0 < a1)) << "expert " << e << " slot " << s;
    }
  }
  ASSERT_EQ(std::accumulate(p.load_before.begin(), p.load_before.end(), int64_t{0}), A);
}

}  // namespace

TEST(Dispatch, PositionIsRankMajor) {
  // T = 4, k = 2, E = 2; C = 3. Expert 0 is asked by (0,0) (1,1) (2,0) (3,0): rank-major
  // order is (0,0) (2,0) (3,0) (1,1), so the second choice of token 1 is dropped.
  const std::vector<int32_t> idx{0, 1, 1, 0, 0, 1, 0, 1};
  const std::vector<float> w(8, 0.5f);
  CapacityPlan p;
  build_capacity_plan<float>(p, idx.data(), w.data(), 4, 2, 2, 3, moe::DropPolicy::position);
  check_plan(p, idx);
  EXPECT_EQ(p.src_to_dest[3], -1);
  EXPECT_EQ(p.load_after, (std::vector<int64_t>{3, 3}));
  // Expert 1: (0,1) (1,0) (2,1) (3,1) → rank-major (1,0) (0,1) (2,1) (3,1): (3,1) dropped.
  EXPECT_EQ(p.src_to_dest[7], -1);
  EXPECT_EQ(p.dropped_tokens, 0);
  EXPECT_EQ(p.dest_to_src[0], 0);  // expert 0's first slot: token 0's first choice
  EXPECT_EQ(p.dest_to_src[3], 2);  // expert 1's first slot: token 1's first choice
}

TEST(Dispatch, ProbsKeepsLargestWeightsTiesToLowerToken) {
  const std::vector<int32_t> idx{0, 0, 0, 0, 0};
  const std::vector<float> w{0.2f, 0.9f, 0.5f, 0.9f, 0.1f};
  CapacityPlan p;
  build_capacity_plan<float>(p, idx.data(), w.data(), 5, 1, 2, 2, moe::DropPolicy::probs);
  check_plan(p, idx);
  // 0.9 at tokens 1 and 3 win; 0.5 at token 2 is dropped.
  EXPECT_EQ(p.src_to_dest, (std::vector<int32_t>{-1, 0, -1, 1, -1}));
  build_capacity_plan<float>(p, idx.data(), w.data(), 5, 1, 2, 1, moe::DropPolicy::probs);
  EXPECT_EQ(p.src_to_dest, (std::vector<int32_t>{-1, 0, -1, -1, -1}));  // tie → token 1
  EXPECT_EQ(p.dropped_tokens, 4);
}

TEST(Dispatch, DroplessKeepsEverything) {
  moe_test::Rng rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t T = 1 + rng.below(50), E = 1 + rng.below(9), k = 1 + rng.below(E);
    std::vector<int32_t> idx(static_cast<size_t>(T * k));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> perm(static_cast<size_t>(E));
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t i = E - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
      std::copy(perm.begin(), perm.begin() + k, idx.begin() + t * k);
    }
    const auto w = rng.vec(T * k, 1.0);
    CapacityPlan p;
    build_capacity_plan<float>(p, idx.data(), w.data(), T, k, E, -1, moe::DropPolicy::probs);
    check_plan(p, idx);
    EXPECT_EQ(p.n_kept, T * k);
    for (auto pol : {moe::DropPolicy::position, moe::DropPolicy::probs}) {
      const int64_t C = rng.below(T + 1);
      build_capacity_plan<float>(p, idx.data(), w.data(), T, k, E, C, pol);
      check_plan(p, idx);
    }
  }
}
