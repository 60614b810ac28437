// Shared helpers of the router tests: one case = a config plus its inputs.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.hpp"

namespace router_test {

struct Case {
  moe::RouterConfig cfg;
  int64_t T = 0;
  std::vector<float> x, W_g, b_g, W_noise, eps;  // eps empty: drawn from the seed
  uint64_t seed = 7, step = 3;

  moe::RouterParams params() const {
    moe::RouterParams p;
    p.W_g = W_g.data();
    p.b_g = b_g.empty() ? nullptr : b_g.data();
    p.W_noise = W_noise.empty() ? nullptr : W_noise.data();
    return p;
  }
  moe::NoiseSource noise(int64_t token_offset = 0) const {
    moe::NoiseSource ns;
    ns.eps = eps.empty() ? nullptr : eps.data();
    ns.seed = seed;
    ns.step = step;
    ns.token_offset = token_offset;
    return ns;
  }
  std::string name() const {
    return "T=" + std::to_string(T) + " d=" + std::to_string(cfg.d_model) +
           " E=" + std::to_string(cfg.n_experts) + " k=" + std::to_string(cfg.k) +
           " noise=" + moe::to_string(cfg.noise) + "/" + moe::to_string(cfg.noise_scale) +
           " tie=" + moe::to_string(cfg.tie_break) + (cfg.use_bias ? " bias" : "") +
           (eps.empty() ? " eps=drawn" : " eps=given");
  }
};

// Values on a coarse dyadic grid: every product and sum the router forms is exact in float
// (|x|, |W| ≤ 1 in steps of 1/8 and 1/16, d ≤ 2^10), so reference and fast see the same h,
// and ties are frequent.
inline std::vector<float> grid_values(std::mt19937& rng, size_t n, int steps, float unit) {
  std::uniform_int_distribution<int> u(-steps, steps);
  std::vector<float> v(n);
  for (auto& a : v) a = static_cast<float>(u(rng)) * unit;
  return v;
}

inline std::vector<float> normal_values(std::mt19937& rng, size_t n, float sd) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> v(n);
  for (auto& a : v) a = nd(rng);
  return v;
}

// A case with its inputs filled: continuous (normal) or on the exact grid.
inline Case make_case(int64_t T, int64_t d, int64_t E, int64_t k, moe::Noise noise,
                      moe::NoiseScale scale, bool use_bias, bool given_eps, bool grid,
                      uint32_t seed) {
  std::mt19937 rng(seed);
  Case c;
  c.cfg.d_model = d;
  c.cfg.n_experts = E;
  c.cfg.k = k;
  c.cfg.noise = noise;
  c.cfg.noise_scale = scale;
  c.cfg.noise_stddev = grid ? 0.5f : 0.8f;
  c.cfg.use_bias = use_bias;
  c.T = T;
  const size_t dE = static_cast<size_t>(d * E);
  if (grid) {
    c.x = grid_values(rng, static_cast<size_t>(T * d), 8, 0.125f);
    c.W_g = grid_values(rng, dE, 4, 0.0625f);
    c.W_noise = grid_values(rng, dE, 4, 0.0625f);
    if (use_bias) c.b_g = grid_values(rng, static_cast<size_t>(E), 4, 0.25f);
    if (given_eps) c.eps = grid_values(rng, static_cast<size_t>(T * E), 4, 0.25f);
  } else {
    const float w_sd = 1.0f / std::sqrt(static_cast<float>(d));
    c.x = normal_values(rng, static_cast<size_t>(T * d), 1.0f);
    c.W_g = normal_values(rng, dE, w_sd);
    c.W_noise = normal_values(rng, dE, w_sd);
    if (use_bias) c.b_g = normal_values(rng, static_cast<size_t>(E), 0.5f);
    if (given_eps) c.eps = normal_values(rng, static_cast<size_t>(T * E), 1.0f);
  }
  if (noise != moe::Noise::learned) c.W_noise.clear();
  return c;
}

inline moe::RouterState route(const Case& c, bool training, bool fast) {
  moe::RouterState s;
  if (fast)
    moe::router_forward(s, c.x.data(), c.params(), c.cfg, c.T, training, c.noise());
  else
    moe::router_forward_ref(s, c.x.data(), c.params(), c.cfg, c.T, training, c.noise());
  return s;
}

// Message of the moe::Error that f throws, or "" if it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace router_test
