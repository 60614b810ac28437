// bf16 expert weights (issue 5, item 4): rounding of single values, and the layer's bf16
// evaluation forward bit-identical with 1 and 2 threads. Accuracy against an oracle is in
// tests/python/test_bf16.py.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "experts/bf16.hpp"
#include "moe/moe.hpp"

namespace {

using moe::detail::from_bf16;
using moe::detail::to_bf16;

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(from_bf16(to_bf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(from_bf16(to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
  EXPECT_EQ(from_bf16(to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(from_bf16(to_bf16(std::numeric_limits<float>::infinity())),
            std::numeric_limits<float>::infinity());
}

std::vector<float> bf16_forward(moe::ExpertKind kind, int threads) {
  moe::MoEConfig c;
  c.d_model = 96;
  c.n_experts = 6;
  c.k = 2;
  c.expert = kind;
  c.d_ff = 130;
  c.noise = moe::Noise::none;
  c.router_init_std = 0.3f;
  c.seed = 11;
  moe::MoELayer layer(c);
  layer.set_bf16_experts(true);
  const int64_t T = 300;
  std::vector<float> x(T * c.d_model), y(T * c.d_model);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  moe::ForwardOptions o;
  o.training = false;
  layer.forward(y.data(), x.data(), T, o);
  omp_set_num_threads(saved);
  return y;
}

TEST(Bf16, LayerForwardBitIdenticalWithOneAndTwoThreads) {
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu}) {
    const auto a = bf16_forward(kind, 1), b = bf16_forward(kind, 2);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << to_string(kind);
  }
}

}  // namespace

namespace {

// Gradients are allocated on first use: an inference-only layer holds its parameters alone.
TEST(LazyGradients, AllocatedOnFirstBackwardOrGrad) {
  moe::MoEConfig c;
  c.d_model = 8;
  c.n_experts = 4;
  c.k = 2;
  c.seed = 1;
  moe::MoELayer layer(c);
  EXPECT_FALSE(layer.has_gradients());
  const int64_t T = 5;
  std::vector<float> x(T * 8, 0.25f), y(T * 8), dx(T * 8), dy(T * 8, 1.0f);
  moe::ForwardOptions o;
  o.training = false;
  layer.forward(y.data(), x.data(), T, o);
  layer.zero_grad();  // nothing to zero yet, and it allocates nothing
  EXPECT_FALSE(layer.has_gradients());
  layer.backward(dx.data(), dy.data());
  EXPECT_TRUE(layer.has_gradients());
  double s = 0;
  for (float v : layer.grad("W1").data) s += std::abs(v);
  EXPECT_GT(s, 0.0);
  EXPECT_EQ(layer.grad("W1").numel(), layer.param("W1").numel());
  // grad() alone allocates zeros (optimizers take the tensors before any backward).
  moe::MoELayer fresh(c);
  EXPECT_EQ(fresh.grad("W2").numel(), fresh.param("W2").numel());
  EXPECT_TRUE(fresh.has_gradients());
  for (float v : fresh.grad("W2").data) EXPECT_EQ(v, 0.0f);
}

}  // namespace
