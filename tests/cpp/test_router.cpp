#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moe/moe.hpp"

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
