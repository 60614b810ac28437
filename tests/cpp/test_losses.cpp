// The auxiliary losses of SPEC §2: the reference loss example, the balanced value, the
// gradient through P only, and the z-loss with its gradient against central differences.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "losses/losses.hpp"
#include "moe/moe.hpp"

namespace {

double lse(const std::vector<double>& h) {
  double s = 0;
  for (double v : h) s += std::exp(v);
  return std::log(s);
}

}  // namespace

// 3 experts, 4 tokens: hard routing sends 3 to expert 1 and 1 to expert 2, P = [0.6, 0.3,
// 0.1]: f = [0.75, 0.25, 0], L = α·3·(0.75·0.6 + 0.25·0.3) = 1.575·α.
TEST(Losses, ReferenceExample) {
  const std::vector<int32_t> idx{0, 0, 1, 0};
  std::vector<float> probs;
  for (int t = 0; t < 4; ++t) probs.insert(probs.end(), {0.6f, 0.3f, 0.1f});
  const double alpha = 0.01;
  std::vector<float> dp(12);
  const double L = moe::load_balancing_loss(dp.data(), idx.data(), probs.data(), 4, 1, 3, alpha, false);
  EXPECT_NEAR(L, 1.575 * alpha, 1e-8);
  // ∂L/∂probs[t,i] = α·E·f_i/T, the same for every token.
  const double f[3] = {0.75, 0.25, 0.0};
  for (int t = 0; t < 4; ++t)
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(dp[t * 3 + i], alpha * 3 * f[i] / 4, 1e-9);
  // The same probs with the hard choices spread differently give another value: f enters.
  const std::vector<int32_t> idx2{0, 1, 2, 0};
  EXPECT_NEAR(moe::load_balancing_loss(nullptr, idx2.data(), probs.data(), 4, 1, 3, alpha, false),
              alpha * 3 * (0.5 * 0.6 + 0.25 * 0.3 + 0.25 * 0.1), 1e-8);
}

// A perfectly balanced batch scores k·α, or α with normalize_by_k.
TEST(Losses, BalancedScoresKAlpha) {
  const int64_t T = 4, E = 4, k = 2;
  const std::vector<int32_t> idx{0, 1, 2, 3, 1, 2, 3, 0};  // every expert twice
  const std::vector<float> probs(T * E, 0.25f);
  const double a = 0.02;
  EXPECT_NEAR(moe::load_balancing_loss(nullptr, idx.data(), probs.data(), T, k, E, a, false), k * a, 1e-8);
  EXPECT_NEAR(moe::load_balancing_loss(nullptr, idx.data(), probs.data(), T, k, E, a, true), a, 1e-8);
  // Imbalance costs more: everything on experts 0 and 1 with probs to match.
  const std::vector<int32_t> skew{0, 1, 0, 1, 0, 1, 0, 1};
  std::vector<float> pskew;
  for (int t = 0; t < T; ++t) pskew.insert(pskew.end(), {0.5f, 0.4f, 0.05f, 0.05f});
  EXPECT_GT(moe::load_balancing_loss(nullptr, skew.data(), pskew.data(), T, k, E, a, false), k * a);
}

TEST(Losses, BoundaryChecks) {
  const std::vector<int32_t> idx{3};
  const std::vector<float> probs{0.5f, 0.5f};
  EXPECT_THROW(moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 1, 2, 0.01, false), moe::Error);
  EXPECT_THROW(moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 3, 2, 0.01, false), moe::Error);
  EXPECT_EQ(moe::load_balancing_loss(nullptr, nullptr, nullptr, 0, 1, 2, 0.01, false), 0.0);
  EXPECT_EQ(moe::router_z_loss(nullptr, nullptr, 0, 2, 0.1), 0.0);
  EXPECT_THROW(moe::router_z_loss(nullptr, probs.data(), 1, 0, 0.1), moe::Error);
}

// L_z = c_z·(1/T)·Σ lse(h_t)², checked by value and its gradient by central differences.
TEST(Losses, ZLossValueAndGradient) {
  std::vector<double> h{0.3, -1.2, 2.0, 0.7, /**/ 5.0, 4.0, -3.0, 0.0, /**/ -0.5, -0.5, -0.5, -0.5};
  const int64_t T = 3, E = 4;
  const double cz = 0.1;
  double want = 0;
  for (int t = 0; t < T; ++t) {
    const double l = lse(std::vector<double>(h.begin() + t * E, h.begin() + (t + 1) * E));
    want += l * l;
  }
  want *= cz / T;
  std::vector<double> g(h.size());
  EXPECT_NEAR(moe::detail::router_z_loss_t<double>(g.data(), h.data(), T, E, cz), want, 1e-12);
  for (size_t i = 0; i < h.size(); ++i) {
    const double keep = h[i], step = 1e-6;
    h[i] = keep + step;
    const double lp = moe::detail::router_z_loss_t<double>(nullptr, h.data(), T, E, cz);
    h[i] = keep - step;
    const double lm = moe::detail::router_z_loss_t<double>(nullptr, h.data(), T, E, cz);
    h[i] = keep;
    EXPECT_NEAR(g[i], (lp - lm) / (2 * step), 1e-8) << i;
  }
  // The float entry point agrees, and is stable for large logits.
  const std::vector<float> hf(h.begin(), h.end());
  std::vector<float> gf(h.size());
  EXPECT_NEAR(moe::router_z_loss(gf.data(), hf.data(), T, E, cz), want, 1e-6);
  for (size_t i = 0; i < h.size(); ++i) EXPECT_NEAR(gf[i], g[i], 1e-6);
  const std::vector<float> big{1000.0f, 999.0f};
  const double l = moe::router_z_loss(nullptr, big.data(), 1, 2, 1.0);
  EXPECT_NEAR(l, std::pow(1000.0 + std::log1p(std::exp(-1.0)), 2), 1e-3);
}

// The balancing loss gradient through P only, by central differences on probs.
TEST(Losses, BalancingGradientThroughPOnly) {
  const int64_t T = 3, E = 3, k = 2;
  const std::vector<int32_t> idx{0, 1, 2, 0, 1, 2};
  std::vector<double> p{0.5, 0.3, 0.2, 0.1, 0.1, 0.8, 0.3, 0.3, 0.4};
  std::vector<double> g(p.size());
  moe::detail::load_balancing_loss_t<double>(g.data(), idx.data(), p.data(), T, k, E, 0.1, true);
  for (size_t i = 0; i < p.size(); ++i) {
    const double keep = p[i], h = 1e-6;
    p[i] = keep + h;
    const double lp = moe::detail::load_balancing_loss_t<double>(nullptr, idx.data(), p.data(), T, k, E, 0.1, true);
    p[i] = keep - h;
    const double lm = moe::detail::load_balancing_loss_t<double>(nullptr, idx.data(), p.data(), T, k, E, 0.1, true);
    p[i] = keep;
    EXPECT_NEAR(g[i], (lp - lm) / (2 * h), 1e-9) << i;
    EXPECT_GT(std::abs(g[i]), 0.0) << i;
  }
}
