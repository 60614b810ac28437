// Noisy top-k gating with fixed σ (SPEC §1), the noise generator and the
// vectorisable math it runs on.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/philox.hpp"
#include "common/vec_math.hpp"
#include "test_router_util.hpp"

namespace {

// Top-k softmax of one row in double, ties to the higher index: the textbook formula.
std::vector<double> topk_softmax_row(const float* row, int64_t E, int64_t k) {
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a > b);
  });
  std::vector<double> g(static_cast<size_t>(E), 0.0);
  double sum = 0.0;
  for (int64_t j = 0; j < k; ++j) sum += std::exp(double(row[order[j]]) - row[order[0]]);
  for (int64_t j = 0; j < k; ++j)
    g[order[j]] = std::exp(double(row[order[j]]) - row[order[0]]) / sum;
  return g;
}

std::vector<float> random_logits(int64_t T, int64_t E, uint32_t seed) {
  std::mt19937 rng(seed);
  return router_test::normal_values(rng, static_cast<size_t>(T * E), 2.0f);
}

}  // namespace

TEST(NoisyTopKGating, AtEvaluationEqualsTopKSoftmaxOfTheLogits) {
  for (int64_t E : {1, 5, 64})
    for (int64_t k : {int64_t{1}, std::min<int64_t>(2, E), E}) {
      const int64_t T = 33;
      const std::vector<float> logits = random_logits(T, E, static_cast<uint32_t>(E * 10 + k));
      const std::vector<float> g =
          moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, /*training=*/false, 123);
      ASSERT_EQ(g.size(), static_cast<size_t>(T * E));
      for (int64_t t = 0; t < T; ++t) {
        const std::vector<double> want = topk_softmax_row(&logits[t * E], E, k);
        for (int64_t e = 0; e < E; ++e)
          EXPECT_NEAR(g[t * E + e], want[e], 1e-6 * want[e] + 1e-7) << "E=" << E << " k=" << k;
      }
    }
}

TEST(NoisyTopKGating, TrainingKeepsExactlyKNonZerosSummingToOne) {
  const int64_t T = 200, E = 16;
  const std::vector<float> logits = random_logits(T, E, 9);
  for (int64_t k : {1, 2, 5, 16}) {
    const std::vector<float> g = moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, true, 4);
    for (int64_t t = 0; t < T; ++t) {
      int nz = 0;
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        ASSERT_TRUE(std::isfinite(g[t * E + e]));
        ASSERT_GE(g[t * E + e], 0.0f);
        nz += g[t * E + e] != 0.0f;
        sum += g[t * E + e];
      }
      EXPECT_EQ(nz, k) << "token " << t;
      EXPECT_NEAR(sum, 1.0, 4e-7 * double(k)) << "token " << t;
    }
  }
}

TEST(NoisyTopKGating, ReproducibleForASeedAndDifferentAcrossSeeds) {
  const int64_t T = 100, E = 8, k = 2;
  const std::vector<float> logits = random_logits(T, E, 3);
  const auto a = moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, true, 42);
  const auto b = moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, true, 42);
  const auto c = moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, true, 43);
  const auto eval = moe::noisy_top_k_gating(logits.data(), T, E, k, 1.0f, false, 42);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  int differ = 0, noisy = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    differ += a[i] != c[i];
    noisy += a[i] != eval[i];
  }
  // With σ = 1 on logits of σ = 2, most rows' weights move; 10% is far below what happens.
  EXPECT_GT(differ, static_cast<int>(a.size() / 10));
  EXPECT_GT(noisy, static_cast<int>(a.size() / 10));
}

TEST(NoisyTopKGating, TieBreakHighIsTheDefault) {
  // Four equal logits, k = 2: the two highest indices win.
  const float logits[] = {1.0f, 1.0f, 1.0f, 1.0f};
  const auto g = moe::noisy_top_k_gating(logits, 1, 4, 2, 1.0f, false, 0);
  EXPECT_EQ(g, (std::vector<float>{0.0f, 0.0f, 0.5f, 0.5f}));
}

TEST(NoisyTopKGating, ErrorsNameTheArgument) {
  const float logits[] = {0.0f, 1.0f, NAN, 2.0f, 3.0f, 4.0f};
  using router_test::error_of;
  EXPECT_NE(error_of([&] { moe::noisy_top_k_gating(logits, 1, 3, 0, 1.0f, true, 0); })
                .find("k: must be in 1..3"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::noisy_top_k_gating(logits, 1, 3, 4, 1.0f, true, 0); })
                .find("k: must be in 1..3"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::noisy_top_k_gating(logits, 1, 3, 1, -1.0f, true, 0); })
                .find("noise_stddev"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { moe::noisy_top_k_gating(logits, 2, 3, 1, 1.0f, true, 0); }),
            "logits: non-finite value at token 0");
  EXPECT_EQ(error_of([&] { moe::noisy_top_k_gating(logits + 3, 1, 3, 1, 1.0f, true, 0); }), "");
  EXPECT_EQ(error_of([&] { moe::noisy_top_k_gating(logits, 3, 2, 1, 1.0f, false, 0); }),
            "logits: non-finite value at token 1");
}

// The drawn noise of a router with fixed σ: H − h = σ·ε over 2^20 draws (T = 16384 tokens of
// 64 experts). For n independent N(0, σ²) draws the sample mean has standard error σ/√n and
// the sample variance σ²·√(2/(n−1)); a correct generator lands within 5 standard errors
// except with probability < 1e-6. Also P(|ε| < 1) = 0.6827 (binomial standard error) and the
// correlation of neighbouring experts and neighbouring tokens (standard error 1/√n) are
// checked, which a generator that reused counters would fail.
TEST(NoisyTopKGating, DrawnNoiseHasMeanZeroAndStddevSigma) {
  const int64_t T = 16384, E = 64;
  const float sigma = 0.7f;
  moe::RouterConfig cfg;
  cfg.d_model = 1;
  cfg.n_experts = E;
  cfg.k = 2;
  cfg.noise = moe::Noise::fixed;
  cfg.noise_stddev = sigma;
  std::vector<float> x(static_cast<size_t>(T), 1.0f), W(static_cast<size_t>(E), 0.0f);
  moe::RouterParams p;
  p.W_g = W.data();
  moe::NoiseSource ns;
  ns.seed = 2024;
  ns.step = 5;
  moe::RouterState s;
  moe::router_forward(s, x.data(), p, cfg, T, true, ns);
  const double n = double(T * E);
  double sum = 0.0, sum2 = 0.0, inside = 0.0, c_exp = 0.0, c_tok = 0.0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      const double z = double(s.noisy[t * E + e]) - s.logits[t * E + e];
      sum += z;
      sum2 += z * z;
      inside += std::abs(z) < sigma;
      const double eps = s.eps[t * E + e];
      ASSERT_NEAR(z, sigma * eps, 1e-6);
      c_exp += eps * s.eps[t * E + (e + 1) % E];
      c_tok += eps * s.eps[((t + 1) % T) * E + e];
    }
  const double mean = sum / n, var = (sum2 - n * mean * mean) / (n - 1);
  const double s2 = double(sigma) * sigma;
  EXPECT_LT(std::abs(mean), 5.0 * sigma / std::sqrt(n));
  EXPECT_LT(std::abs(var - s2), 5.0 * s2 * std::sqrt(2.0 / (n - 1)));
  const double p1 = 0.6826894921370859;
  EXPECT_LT(std::abs(inside / n - p1), 5.0 * std::sqrt(p1 * (1 - p1) / n));
  EXPECT_LT(std::abs(c_exp / n), 5.0 / std::sqrt(n));
  EXPECT_LT(std::abs(c_tok / n), 5.0 / std::sqrt(n));
}

TEST(Philox, MatchesRandom123KnownAnswers) {
  // Random123's kat_vectors for philox4x32-10: (counter, key) → output.
  using moe::detail::Philox4;
  const auto r0 = moe::detail::philox4x32_10(Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(r0.v[0], 0x6627e8d5u);
  EXPECT_EQ(r0.v[1], 0xe169c58du);
  EXPECT_EQ(r0.v[2], 0xbc57ac4cu);
  EXPECT_EQ(r0.v[3], 0x9b00dbd8u);
  const auto r1 = moe::detail::philox4x32_10(
      Philox4{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(r1.v[0], 0x408f276du);
  EXPECT_EQ(r1.v[1], 0x41c83b0eu);
  EXPECT_EQ(r1.v[2], 0xa20bc7c6u);
  EXPECT_EQ(r1.v[3], 0x6d5451fdu);
}

TEST(Philox, VectorisedNormalsMatchScalarPhiloxAndDoubleBoxMuller) {
  // moe::philox_normal (the 16-lane kernel) against the scalar Philox words pushed through
  // Box–Muller in double: agreement to a few float ulp of the radius.
  const double kTwoPi = 6.283185307179586;
  for (uint64_t seed : {0ull, 1ull, 0x123456789abcdefull})
    for (int64_t token : {int64_t{0}, int64_t{5}, int64_t{1} << 33})
      for (int64_t expert = 0; expert < 40; ++expert) {
        const auto c = moe::detail::philox_counter(9, token, expert / 4);
        const auto w = moe::detail::philox4x32_10(c, static_cast<uint32_t>(seed),
                                                  static_cast<uint32_t>(seed >> 32));
        const int pair = static_cast<int>(expert % 4) / 2;
        const double u1 = (double(w.v[2 * pair] >> 8) + 1.0) / 16777216.0;
        const double u2 = double(w.v[2 * pair + 1] >> 8) / 16777216.0;
        const double rad = std::sqrt(-2.0 * std::log(u1));
        const double want = expert % 2 == 0 ? rad * std::cos(kTwoPi * u2) : rad * std::sin(kTwoPi * u2);
        const float got = moe::philox_normal(seed, 9, token, expert);
        EXPECT_NEAR(got, want, 1e-6 * (1.0 + rad)) << seed << " " << token << " " << expert;
      }
}

TEST(Philox, RowsAgreeWithTheScalarFunctionBitForBit) {
  for (int64_t E : {1, 3, 4, 7, 64, 257}) {
    const int64_t n_tok = 11;
    std::vector<float> rows(static_cast<size_t>(n_tok * (E + 2)), -99.0f);
    moe::detail::philox_normal_rows(rows.data(), E + 2, n_tok, E, 77, 1, 1000);
    for (int64_t t = 0; t < n_tok; ++t) {
      for (int64_t e = 0; e < E; ++e)
        ASSERT_EQ(rows[t * (E + 2) + e], moe::philox_normal(77, 1, 1000 + t, e)) << E;
      EXPECT_EQ(rows[t * (E + 2) + E], -99.0f);  // nothing written past E
    }
  }
}

TEST(RouterMath, VectorisableFunctionsStayWithinAFewUlp) {
  constexpr double u = 5.9604644775390625e-8;
  double worst_exp = 0, worst_log = 0, worst_sp = 0, worst_sqrt = 0, worst_sc = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f * float(i) / 200000.0f;
    const double e = std::exp(double(x));
    worst_exp = std::max(worst_exp, std::abs(moe::detail::exp_f32(x) - e) / e);
    const float z = -30.0f + 60.0f * float(i) / 200000.0f;
    const double sp = std::log1p(std::exp(-std::abs(double(z)))) + std::max(double(z), 0.0);
    worst_sp = std::max(worst_sp, std::abs(moe::detail::softplus_f32(z) - sp) / sp);
    const float v = std::ldexp(1.0f + float(i) / 200000.0f, -(i % 25));  // (2^-24, 2]
    worst_log = std::max(worst_log,
                         std::abs(moe::detail::log_f32(v) - std::log(double(v))) /
                             std::max(1.0, std::abs(std::log(double(v)))));
    const float r = 34.0f * float(i) / 200000.0f;
    if (r > 0)
      worst_sqrt = std::max(worst_sqrt, std::abs(moe::detail::sqrt_f32(r) - std::sqrt(double(r))) /
                                            std::sqrt(double(r)));
    const float w = float(i % 16777216) / 16777216.0f + float(i) / 200000.0f * 0.99f;
    const float uu = w - std::floor(w);
    float s, c;
    moe::detail::sincos2pi_f32(uu, s, c);
    const double a = 6.283185307179586 * double(uu);
    worst_sc = std::max({worst_sc, std::abs(s - std::sin(a)), std::abs(c - std::cos(a))});
  }
  EXPECT_LT(worst_exp, 4 * u);
  EXPECT_LT(worst_sp, 4 * u);
  EXPECT_LT(worst_log, 4 * u);
  EXPECT_LT(worst_sqrt, 4 * u);
  EXPECT_LT(worst_sc, 4 * u);
  EXPECT_EQ(moe::detail::exp_f32(-INFINITY), 0.0f);
  EXPECT_EQ(moe::detail::exp_f32(-100.0f), 0.0f);
  EXPECT_EQ(moe::detail::exp_f32(0.0f), 1.0f);
  EXPECT_TRUE(std::isnan(moe::detail::exp_f32(NAN)));
  EXPECT_TRUE(std::isnan(moe::detail::softplus_f32(NAN)));
  EXPECT_EQ(moe::detail::softplus_f32(INFINITY), INFINITY);
  EXPECT_EQ(moe::detail::softplus_f32(-INFINITY), 0.0f);
  EXPECT_EQ(moe::detail::sqrt_f32(0.0f), 0.0f);
}
