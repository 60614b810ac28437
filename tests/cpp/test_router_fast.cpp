// The fast router against its reference twin, on awkward shapes, and the fast router's
// determinism: bit-identical for any thread count and for a batch routed whole or in parts.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "test_router_util.hpp"

using router_test::Case;
using router_test::make_case;
using router_test::route;

namespace {

constexpr double kU = 5.9604644775390625e-8;  // 2^-24, float's unit roundoff

// |h_fast - h_ref| ≤ 2·(d+1)·u·(Σ_i |x_i W_ie| + |b_e|): each of the two sums is within
// (d+1)·u·Σ|terms| of the exact value whatever its summation order (Higham, Thm 3.1).
std::vector<double> h_error_bound(const Case& c, const std::vector<float>& W) {
  const int64_t d = c.cfg.d_model, E = c.cfg.n_experts;
  std::vector<double> b(static_cast<size_t>(c.T * E));
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double s = c.b_g.empty() ? 0.0 : std::abs(c.b_g[e]);
      for (int64_t i = 0; i < d; ++i) s += std::abs(double(c.x[t * d + i]) * W[i * E + e]);
      b[t * E + e] = 2.0 * double(d + 1) * kU * s + 1e-30;
    }
  return b;
}

// Compares fast (f) with reference (r). exact: the inputs are on the exact grid, so h and H
// agree bit for bit and so must the selection, ties included. Otherwise selections are
// compared on rows whose ranking is further from a tie than the derived error of H.
void expect_matches_reference(const Case& c, bool training) {
  SCOPED_TRACE(c.name() + (training ? " training" : " evaluation"));
  const moe::RouterState f = route(c, training, true);
  const moe::RouterState r = route(c, training, false);
  const int64_t T = c.T, E = c.cfg.n_experts, k = c.cfg.k;
  ASSERT_EQ(f.T, T);
  ASSERT_EQ(f.indices.size(), r.indices.size());
  ASSERT_EQ(f.probs.size(), r.probs.size());
  ASSERT_EQ(f.eps.size(), r.eps.size());
  ASSERT_EQ(f.noise_pre.size(), r.noise_pre.size());
  const bool exact = c.x.empty() || std::all_of(c.x.begin(), c.x.end(), [](float v) {
    return v * 8.0f == std::round(v * 8.0f);
  });
  const bool noisy = training && c.cfg.noise != moe::Noise::none;
  // H is stored only when noise made it differ from h (H() reads h otherwise).
  ASSERT_EQ(f.noisy.size(), static_cast<size_t>(noisy ? T * E : 0));
  ASSERT_EQ(r.noisy.size(), f.noisy.size());
  const bool exact_H = exact && (!noisy || c.cfg.noise == moe::Noise::fixed ||
                                 (c.cfg.noise_scale == moe::NoiseScale::linear && !c.eps.empty()));
  // ε is the same generator in both: equal bits.
  // (memcmp on an empty vector's null data() is undefined behaviour, which UBSan reports.)
  if (!f.eps.empty()) {
    EXPECT_EQ(0, std::memcmp(f.eps.data(), r.eps.data(), f.eps.size() * sizeof(float)));
  }

  const std::vector<double> bh = h_error_bound(c, c.W_g);
  const std::vector<double> bp = noisy && c.cfg.noise == moe::Noise::learned
                                     ? h_error_bound(c, c.W_noise)
                                     : std::vector<double>(bh.size(), 0.0);
  std::vector<double> bH(bh.size());
  for (size_t i = 0; i < bh.size(); ++i) {
    ASSERT_LE(std::abs(double(f.logits[i]) - r.logits[i]), bh[i]) << "h at " << i;
    if (!f.noise_pre.empty()) {
      ASSERT_LE(std::abs(double(f.noise_pre[i]) - r.noise_pre[i]), bp[i]) << "pre at " << i;
    }
    // H = h + scale·ε: scale is within bp + a few ulp (softplus), the sum adds an ulp.
    const double eps = noisy ? std::abs(double(r.eps[i])) : 0.0;
    bH[i] = bh[i] + eps * (bp[i] + 8 * kU * (1.0 + std::abs(double(r.H()[i]) - r.logits[i]))) +
            4 * kU * std::abs(double(r.H()[i]));
    if (exact_H) {
      ASSERT_EQ(f.H()[i], r.H()[i]) << "H at " << i;
      bH[i] = 0.0;
    } else {
      ASSERT_LE(std::abs(double(f.H()[i]) - r.H()[i]), bH[i]) << "H at " << i;
    }
  }

  int64_t checked = 0;
  for (int64_t t = 0; t < T; ++t) {
    // H's error could reorder values closer than 2·err: the kept set is compared where the
    // k-th and (k+1)-th are further apart (always when k = E), each rank where its value is
    // apart from both neighbours. With exact H everything is compared, ties included.
    double row_err = 0.0;
    for (int64_t e = 0; e < E; ++e) row_err = std::max(row_err, bH[t * E + e]);
    std::vector<float> sorted(r.H() + t * E, r.H() + (t + 1) * E);
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    auto apart = [&](int64_t j) {  // rank j's value is apart from rank j + 1's
      return exact_H || j + 1 >= E || double(sorted[j]) - sorted[j + 1] > 2 * row_err;
    };
    if (!apart(k - 1)) continue;
    ++checked;
    for (int64_t j = 0; j < k; ++j)
      if ((j == 0 || apart(j - 1)) && apart(j)) {
        ASSERT_EQ(f.indices[t * k + j], r.indices[t * k + j]) << "token " << t << " rank " << j;
      }
    // Weights by expert, so that a swap of two near-equal ranks does not matter. Each exp
    // is within 3 ulp, each n-term sum of positives within (n-1)·u relative whatever its
    // order, the division adds an ulp; H's error δ moves a softmax output by at most 2δ·w.
    std::vector<double> gf(static_cast<size_t>(E), 0.0), gr(static_cast<size_t>(E), 0.0);
    for (int64_t j = 0; j < k; ++j) {
      gf[f.indices[t * k + j]] = f.weights[t * k + j];
      gr[r.indices[t * k + j]] = r.weights[t * k + j];
    }
    for (int64_t e = 0; e < E; ++e) {
      ASSERT_EQ(gf[e] != 0.0, gr[e] != 0.0) << "token " << t << " expert " << e;
      EXPECT_NEAR(gf[e], gr[e], (2.0 * k + 8) * kU * gr[e] + 4 * row_err * gr[e] + 1e-12)
          << "token " << t << " expert " << e;
      const double p = r.probs[t * E + e];
      EXPECT_NEAR(f.probs[t * E + e], p, (2.0 * E + 8) * kU * p + 4 * row_err * p + 1e-12)
          << "token " << t;
    }
  }
  // Zero trust: the comparison must not pass by skipping everything.
  EXPECT_GE(checked, T * 8 / 10);
}

using Shape = std::tuple<int64_t, int64_t, int64_t>;  // d, E, k

const Shape kShapes[] = {{1, 1, 1},   {3, 2, 2},    {67, 8, 1},  {67, 8, 8},
                         {130, 17, 3}, {5, 64, 2},  {33, 64, 17}, {33, 64, 64},
                         {16, 1000, 2}, {7, 1000, 17}, {7, 1000, 1000}};

struct Mode {
  moe::Noise noise;
  moe::NoiseScale scale;
  bool training, given_eps;
};
const Mode kModes[] = {{moe::Noise::none, moe::NoiseScale::softplus, false, false},
                       {moe::Noise::learned, moe::NoiseScale::softplus, false, false},
                       {moe::Noise::fixed, moe::NoiseScale::softplus, true, false},
                       {moe::Noise::learned, moe::NoiseScale::softplus, true, false},
                       {moe::Noise::learned, moe::NoiseScale::linear, true, true}};

void run_all_shapes(bool grid) {
  uint32_t seed = grid ? 100 : 200;
  for (int64_t T : {0, 1, 37})
    for (const auto& [d, E, k] : kShapes)
      for (const Mode& m : kModes) {
        ++seed;
        Case c = make_case(T, d, E, k, m.noise, m.scale, seed % 2 == 0, m.given_eps, grid, seed);
        c.cfg.tie_break = seed % 3 == 0 ? moe::TieBreak::low : moe::TieBreak::high;
        expect_matches_reference(c, m.training);
      }
}

moe::RouterState route_with_threads(const Case& c, bool training, int threads) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  moe::RouterState s = route(c, training, true);
  omp_set_num_threads(before);
  return s;
}

template <typename V>
void expect_bits(const V& a, const V& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  if (a.empty()) return;  // memcmp on a null data() is undefined, even for 0 bytes
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0]))) << what;
}

void expect_identical(const moe::RouterState& a, const moe::RouterState& b) {
  expect_bits(a.indices, b.indices, "indices");
  expect_bits(a.weights, b.weights, "weights");
  expect_bits(a.logits, b.logits, "logits");
  expect_bits(a.noisy, b.noisy, "noisy");
  expect_bits(a.probs, b.probs, "probs");
  expect_bits(a.eps, b.eps, "eps");
  expect_bits(a.noise_pre, b.noise_pre, "noise_pre");
}

}  // namespace

TEST(RouterFast, MatchesReferenceExactlyOnGridInputsWithTies) { run_all_shapes(true); }

TEST(RouterFast, MatchesReferenceWithinDerivedBoundsOnRandomInputs) { run_all_shapes(false); }

TEST(RouterFast, LargeKUsesHeapSelectionCorrectly) {
  // k above the insertion limit (16), up to k = E, against the reference.
  for (int64_t k : {17, 20, 39, 40})
    expect_matches_reference(make_case(29, 9, 40, k, moe::Noise::fixed, moe::NoiseScale::softplus,
                                       false, false, true, static_cast<uint32_t>(k)),
                             true);
}

TEST(RouterFast, BitIdenticalWithOneAndTwoThreads) {
  for (const Mode& m : kModes) {
    const Case c =
        make_case(300, 70, 24, 3, m.noise, m.scale, true, m.given_eps, false, 11);
    SCOPED_TRACE(c.name());
    expect_identical(route_with_threads(c, m.training, 1), route_with_threads(c, m.training, 2));
  }
}

TEST(RouterFast, BitIdenticalWholeOrSplitWithTokenOffsets) {
  // Split points off every block size (16-token chunks, 64-row GEMM blocks) and on one.
  for (const Mode& m : kModes)
    for (int64_t split : {1, 37, 64, 150}) {
      const Case whole = make_case(203, 45, 13, 2, m.noise, m.scale, true, m.given_eps, false, 5);
      SCOPED_TRACE(whole.name() + " split at " + std::to_string(split));
      const moe::RouterState all = route(whole, m.training, true);
      const int64_t d = whole.cfg.d_model, E = whole.cfg.n_experts, k = whole.cfg.k;
      moe::RouterState part[2];
      for (int i = 0; i < 2; ++i) {
        const int64_t t0 = i == 0 ? 0 : split, n = i == 0 ? split : whole.T - split;
        moe::NoiseSource ns = whole.noise(t0);
        if (ns.eps) ns.eps += t0 * E;
        moe::router_forward(part[i], whole.x.data() + t0 * d, whole.params(), whole.cfg, n,
                            m.training, ns);
      }
      auto joined = [&](auto member) {
        auto v = part[0].*member;
        const auto& tail = part[1].*member;
        v.insert(v.end(), tail.begin(), tail.end());
        return v;
      };
      ASSERT_EQ(all.indices.size(), static_cast<size_t>(whole.T * k));
      expect_bits(joined(&moe::RouterState::indices), all.indices, "indices");
      expect_bits(joined(&moe::RouterState::weights), all.weights, "weights");
      expect_bits(joined(&moe::RouterState::logits), all.logits, "logits");
      expect_bits(joined(&moe::RouterState::noisy), all.noisy, "noisy");
      expect_bits(joined(&moe::RouterState::probs), all.probs, "probs");
      expect_bits(joined(&moe::RouterState::eps), all.eps, "eps");
      expect_bits(joined(&moe::RouterState::noise_pre), all.noise_pre, "noise_pre");
    }
}

TEST(RouterFast, ReusedStateGivesTheSameResult) {
  // The state's buffers and scratch are reused across calls of different shapes and modes.
  const Case a = make_case(50, 20, 9, 2, moe::Noise::learned, moe::NoiseScale::softplus, true,
                           false, false, 1);
  const Case b = make_case(7, 20, 9, 2, moe::Noise::none, moe::NoiseScale::softplus, false,
                           false, false, 2);
  moe::RouterState s;
  moe::router_forward(s, b.x.data(), b.params(), b.cfg, b.T, true, b.noise());
  moe::router_forward(s, a.x.data(), a.params(), a.cfg, a.T, true, a.noise());
  expect_identical(s, route(a, true, true));
}
