#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moe/moe.hpp"
#include "test_router_util.hpp"

namespace {

struct Example {
  std::vector<float> X, W_g, W_noise, N;
  int64_t T, d, E, k;
};

std::vector<float> route_gates(const Example& ex, moe::NoiseScale scale) {
  moe::RouterConfig cfg;
  cfg.d_model = ex.d;
  cfg.n_experts = ex.E;
  cfg.k = ex.k;
  cfg.noise = moe::Noise::learned;
  cfg.noise_scale = scale;
  moe::RouterParams p;
  p.W_g = ex.W_g.data();
  p.W_noise = ex.W_noise.data();
  moe::NoiseSource ns;
  ns.eps = ex.N.data();
  moe::RouterState s;
  moe::router_forward(s, ex.X.data(), p, cfg, ex.T, true, ns);
  return s.dense_gates();
}

void expect_rounded(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(std::round(got[i] * 1000.0f) / 1000.0f, want[i], 1e-6) << "entry " << i;
}

const Example kEx1{{1, 2}, {1, 0, 0, 1}, {.5, .5, .5, .5}, {1, -1}, 1, 2, 2, 2};
const Example kEx2{{1, 0, 0, 1}, {1, .5, 0, 0, .5, 1}, std::vector<float>(6, 0.1f),
                   {.5, -.5, .2, .1, 0, -.1}, 2, 2, 3, 2};
const Example kEx3{{1, 1}, {2, 1, .5, 0, 1, .5}, std::vector<float>(6, 0.1f),
                   std::vector<float>(3, 0.0f), 1, 2, 3, 1};

}  // namespace

TEST(RouterReference, LinearScaleReproducesPublishedOutputs) {
  expect_rounded(route_gates(kEx1, moe::NoiseScale::linear), {0.881f, 0.119f});
  expect_rounded(route_gates(kEx2, moe::NoiseScale::linear), {0.646f, 0.354f, 0.0f, 0.0f, 0.38f, 0.62f});
  expect_rounded(route_gates(kEx3, moe::NoiseScale::linear), {0.0f, 1.0f, 0.0f});
}

TEST(RouterReference, SoftplusScaleIsTheDefaultFormula) {
  expect_rounded(route_gates(kEx1, moe::NoiseScale::softplus), {0.917f, 0.083f});
  expect_rounded(route_gates(kEx2, moe::NoiseScale::softplus),
                 {0.773f, 0.0f, 0.227f, 0.0f, 0.395f, 0.605f});
}

namespace {

std::vector<int32_t> route_indices(const Example& ex, moe::TieBreak tie, bool fast) {
  moe::RouterConfig cfg;
  cfg.d_model = ex.d;
  cfg.n_experts = ex.E;
  cfg.k = ex.k;
  cfg.noise = moe::Noise::learned;
  cfg.noise_scale = moe::NoiseScale::linear;
  cfg.tie_break = tie;
  moe::RouterParams p;
  p.W_g = ex.W_g.data();
  p.W_noise = ex.W_noise.data();
  moe::NoiseSource ns;
  ns.eps = ex.N.data();
  moe::RouterState s;
  if (fast)
    moe::router_forward(s, ex.X.data(), p, cfg, ex.T, true, ns);
  else
    moe::router_forward_ref(s, ex.X.data(), p, cfg, ex.T, true, ns);
  return s.indices;
}

}  // namespace

TEST(RouterReference, TieBreakHighAndLow) {
  // Example 3: h = [2, 2, 1], no noise (N = 0): experts 0 and 1 tie for the single slot.
  for (bool fast : {false, true}) {
    EXPECT_EQ(route_indices(kEx3, moe::TieBreak::high, fast), (std::vector<int32_t>{1}));
    EXPECT_EQ(route_indices(kEx3, moe::TieBreak::low, fast), (std::vector<int32_t>{0}));
  }
  // Five equal logits, k = 3, through every selection: best first means highest (lowest)
  // index first.
  Example flat{{1}, std::vector<float>(5, 1.0f), std::vector<float>(5, 0.0f),
               std::vector<float>(5, 0.0f), 1, 1, 5, 3};
  for (bool fast : {false, true}) {
    EXPECT_EQ(route_indices(flat, moe::TieBreak::high, fast), (std::vector<int32_t>{4, 3, 2}));
    EXPECT_EQ(route_indices(flat, moe::TieBreak::low, fast), (std::vector<int32_t>{0, 1, 2}));
  }
}

TEST(RouterReference, ReferenceReproducesPublishedOutputsToo) {
  // The oracle itself must meet the published numbers, not only the fast path.
  moe::RouterConfig cfg;
  cfg.d_model = 2;
  cfg.n_experts = 3;
  cfg.k = 2;
  cfg.noise = moe::Noise::learned;
  cfg.noise_scale = moe::NoiseScale::linear;
  moe::RouterParams p;
  p.W_g = kEx2.W_g.data();
  p.W_noise = kEx2.W_noise.data();
  moe::NoiseSource ns;
  ns.eps = kEx2.N.data();
  moe::RouterState s;
  moe::router_forward_ref(s, kEx2.X.data(), p, cfg, 2, true, ns);
  expect_rounded(s.dense_gates(), {0.646f, 0.354f, 0.0f, 0.0f, 0.38f, 0.62f});
}

namespace {

// One router call whose inputs can be broken one at a time; run through both entry points,
// which must fail with the same message.
struct ErrorCase {
  moe::RouterConfig cfg;
  std::vector<float> x, W_g, b_g, W_noise, eps;
  int64_t T = 6;
  bool training = true;
  int64_t offset = 0;
  bool given_eps = false;

  ErrorCase() {
    cfg.d_model = 3;
    cfg.n_experts = 4;
    cfg.k = 2;
    cfg.noise = moe::Noise::learned;
    cfg.use_bias = true;
    x.assign(18, 0.5f);
    W_g.assign(12, 0.25f);
    b_g.assign(4, 0.0f);
    W_noise.assign(12, 0.1f);
    eps.assign(24, 0.3f);
  }
  std::string run(bool fast) const {
    moe::RouterParams p;
    p.W_g = W_g.empty() ? nullptr : W_g.data();
    p.b_g = b_g.empty() ? nullptr : b_g.data();
    p.W_noise = W_noise.empty() ? nullptr : W_noise.data();
    moe::NoiseSource ns;
    ns.eps = given_eps ? eps.data() : nullptr;
    ns.token_offset = offset;
    return router_test::error_of([&] {
      moe::RouterState s;
      const float* xp = x.empty() ? nullptr : x.data();
      if (fast)
        moe::router_forward(s, xp, p, cfg, T, training, ns);
      else
        moe::router_forward_ref(s, xp, p, cfg, T, training, ns);
    });
  }
};

void expect_error(const ErrorCase& c, const std::string& want) {
  EXPECT_EQ(c.run(false), want) << "reference";
  EXPECT_EQ(c.run(true), want) << "fast";
}

}  // namespace

TEST(RouterErrors, NameTheArgumentAndTheFirstBadToken) {
  expect_error(ErrorCase{}, "");
  {
    ErrorCase c;
    c.cfg.k = 0;
    expect_error(c, "k: must be in 1..4 (n_experts), got 0");
    c.cfg.k = 5;
    expect_error(c, "k: must be in 1..4 (n_experts), got 5");
  }
  {
    ErrorCase c;
    c.cfg.n_experts = 0;
    c.cfg.k = 0;
    expect_error(c, "n_experts: must be at least 1, got 0");
  }
  {
    ErrorCase c;
    c.cfg.noise_stddev = -1.0f;
    expect_error(c, "noise_stddev: must be finite and >= 0, got -1");
  }
  {
    ErrorCase c;
    c.W_g.clear();
    expect_error(c, "W_g: missing");
  }
  {
    ErrorCase c;
    c.b_g.clear();
    expect_error(c, "b_g: missing (use_bias is set)");
  }
  {
    ErrorCase c;
    c.W_noise.clear();
    expect_error(c, "W_noise: missing (learned noise in training)");
    c.training = false;  // evaluation never reads W_noise
    expect_error(c, "");
  }
  {
    ErrorCase c;
    c.x.clear();
    expect_error(c, "x: missing (T = 6)");
    c.T = 0;  // nothing to read
    expect_error(c, "");
  }
  {
    ErrorCase c;
    c.T = -1;
    expect_error(c, "T: must be >= 0, got -1");
  }
  {
    ErrorCase c;
    c.offset = -3;
    expect_error(c, "token_offset: must be >= 0, got -3");
  }
  {
    ErrorCase c;
    c.x[3 * 4 + 1] = NAN;  // token 4
    c.x[3 * 5] = INFINITY;  // token 5
    expect_error(c, "x: non-finite value at token 4");
    c.offset = 100;
    expect_error(c, "x: non-finite value at token 104 (row 4 of this batch, token_offset 100)");
  }
  {
    ErrorCase c;
    c.W_g[2] = INFINITY;  // column 2 of W_g: every token's h is bad, the first is named
    expect_error(c, "router logits h: non-finite value at token 0");
  }
  {
    ErrorCase c;
    c.x.assign(18, 3e38f);  // finite x and W_g whose product overflows
    c.W_g.assign(12, 1.0f);
    expect_error(c, "router logits h: non-finite value at token 0");
  }
  {
    ErrorCase c;
    c.given_eps = true;
    c.eps[4 * 2 + 3] = NAN;  // token 2
    expect_error(c, "noise eps: non-finite value at token 2");
    c.training = false;  // no noise at evaluation: ε is not read
    expect_error(c, "");
  }
  {
    ErrorCase c;
    c.given_eps = true;
    c.cfg.noise_scale = moe::NoiseScale::linear;
    c.W_noise.assign(12, 1e38f);  // x·W_noise = 1.5e38, times ε = 3 overflows H at token 3
    c.eps.assign(24, 0.0f);
    c.eps[4 * 3] = 3.0f;
    expect_error(c, "noisy logits H: non-finite value at token 3");
  }
  EXPECT_EQ(router_test::error_of([] { moe::parse_tie_break("middle"); }),
            "tie_break: unknown value 'middle' (expected high, low or torch)");
  EXPECT_EQ(router_test::error_of([] { moe::parse_noise_scale("exp"); }),
            "noise_scale: unknown value 'exp' (expected softplus or linear)");
  EXPECT_EQ(router_test::error_of([] { moe::parse_noise("loud"); }),
            "noise: unknown mode 'loud' (expected none, fixed or learned)");
}
