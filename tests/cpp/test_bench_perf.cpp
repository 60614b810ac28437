// The benchmark helpers of src/perf/: the streaming read kernel must read every element
// (else the bandwidth it reports is fiction), the FLOP and byte counts must match the
// formulas of issue 5 and the layer's real parameters, and the configurations must be the
// issue's. No timing is asserted.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moe/layer.hpp"
#include "perf/roofline.hpp"
#include "perf/suite.hpp"

namespace {

using moe::perf::BenchCase;
using moe::MoEConfig;

TEST(BenchPerf, StreamReadSumReadsEveryElement) {
  // Sizes off the 16-lane step and across the fixed chunk boundary (2^18 floats).
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{17}, int64_t{1} << 18,
                    (int64_t{1} << 18) + 5, 3 * (int64_t{1} << 18) + 31}) {
    std::vector<float> v(static_cast<size_t>(n));
    double ref = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      v[static_cast<size_t>(i)] = static_cast<float>((i * 37) % 101) - 50.0f;
      ref += v[static_cast<size_t>(i)];
    }
    EXPECT_DOUBLE_EQ(moe::perf::stream_read_sum(v.data(), n), ref) << "n=" << n;
  }
}

TEST(BenchPerf, MedianOfOddAndEvenCounts) {
  EXPECT_DOUBLE_EQ(moe::perf::median({3.0, 1.0, 2.0}), 2.0);
  EXPECT_DOUBLE_EQ(moe::perf::median({4.0, 1.0, 3.0, 2.0}), 2.5);
  EXPECT_DOUBLE_EQ(moe::perf::median({}), 0.0);
}

TEST(BenchPerf, ExpertFlopsFollowTheKind) {
  moe::MoEConfig c;
  c.d_model = 3;
  c.d_ff = 5;
  c.d_out = 7;
  c.expert = moe::ExpertKind::linear_relu;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * 3 * 7);
  c.expert = moe::ExpertKind::mlp;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * (3 * 5 + 5 * 7));
  c.expert = moe::ExpertKind::swiglu;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * (2 * 3 * 5 + 5 * 7));
}

TEST(BenchPerf, RouterFlopsDoubleOnlyForLearnedNoiseInTraining) {
  moe::MoEConfig c;
  c.d_model = 4;
  c.n_experts = 6;
  c.noise = moe::Noise::learned;
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, true), 2.0 * 2 * 10 * 4 * 6);
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, false), 2.0 * 10 * 4 * 6);
  c.noise = moe::Noise::fixed;
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, true), 2.0 * 10 * 4 * 6);
}

TEST(BenchPerf, ConfigurationsAndTheirShapes) {
  const auto cases = moe::perf::bench_cases(false);
  std::vector<std::string> names;
  for (const auto& c : cases) names.push_back(c.name);
  EXPECT_EQ(names, (std::vector<std::string>{"B1", "B2", "B3-T1", "B3-T4", "B3-T16", "E8", "E64",
                                             "E256", "E1024", "Qwen3-30B-A3B",
                                             "Mixtral-8x7B"}));
  const BenchCase& b1 = cases[0];
  EXPECT_EQ(b1.T, 4096);
  EXPECT_EQ(b1.cfg.d_model, 1024);
  EXPECT_EQ(b1.cfg.hidden(), 2048);
  EXPECT_EQ(b1.cfg.n_experts, 16);
  EXPECT_EQ(b1.cfg.k, 2);
  EXPECT_EQ(b1.cfg.expert, moe::ExpertKind::mlp);
  EXPECT_EQ(b1.cfg.activation, moe::Activation::relu);
  ASSERT_TRUE(b1.cfg.capacity_factor.has_value());
  EXPECT_DOUBLE_EQ(*b1.cfg.capacity_factor, 1.25);
  EXPECT_EQ(b1.cfg.noise, moe::Noise::learned);
  EXPECT_EQ(cases[1].cfg.n_experts, 256);
  EXPECT_EQ(cases[1].cfg.hidden(), 512);
  for (int i = 2; i < 5; ++i) {
    EXPECT_EQ(cases[i].cfg.d_model, 4096);
    EXPECT_EQ(cases[i].cfg.hidden(), 14336);
    EXPECT_EQ(cases[i].cfg.expert, moe::ExpertKind::swiglu);
    EXPECT_EQ(cases[i].cfg.n_experts, 8);
    EXPECT_FALSE(cases[i].training);
    EXPECT_TRUE(cases[i].memory_roof);
  }
  // The real-model blocks: prefill of 512 tokens, swiglu, softmax then top-k renormalised,
  // dropless, bf16, evaluation, roof max(compute, weight bytes).
  for (int i : {9, 10}) {
    const MoEConfig& m = cases[i].cfg;
    EXPECT_EQ(cases[i].group, "real");
    EXPECT_EQ(cases[i].T, 512);
    EXPECT_EQ(m.expert, moe::ExpertKind::swiglu);
    EXPECT_EQ(m.router_kind, moe::RouterKind::softmax_topk);
    EXPECT_TRUE(m.renormalize);
    EXPECT_FALSE(m.capacity_factor.has_value());
    EXPECT_EQ(m.precision, moe::Precision::bf16);
    EXPECT_TRUE(cases[i].weights_roof && !cases[i].training && !cases[i].backward);
  }
  EXPECT_EQ(cases[9].cfg.d_model, 2048);
  EXPECT_EQ(cases[9].cfg.hidden(), 768);
  EXPECT_EQ(cases[9].cfg.n_experts, 128);
  EXPECT_EQ(cases[9].cfg.k, 8);
  EXPECT_EQ(cases[10].cfg.d_model, 4096);
  EXPECT_EQ(cases[10].cfg.hidden(), 14336);
  EXPECT_EQ(cases[10].cfg.n_experts, 8);
  EXPECT_EQ(cases[10].cfg.k, 2);
  // --precision bf16 alone: B1, B3-T1 and the real-model blocks, all bf16.
  std::vector<std::string> bf;
  for (const auto& c : moe::perf::default_cases(false, moe::Precision::bf16)) {
    bf.push_back(c.name);
    EXPECT_EQ(c.cfg.precision, moe::Precision::bf16);
  }
  EXPECT_EQ(bf, (std::vector<std::string>{"B1", "B3-T1", "Qwen3-30B-A3B", "Mixtral-8x7B"}));
  // bf16 reads half the weight bytes (biases stay fp32).
  MoEConfig m = b1.cfg;
  const int64_t w32 = moe::perf::expert_read_bytes(m);
  m.precision = moe::Precision::bf16;
  EXPECT_EQ(moe::perf::expert_read_bytes(m), (w32 - 4 * (2048 + 1024)) / 2 + 4 * (2048 + 1024));
  // The E-sweep keeps B1's routed FLOPs at every E.
  const double b1_flops = moe::perf::expert_flops(b1.cfg, b1.T * b1.cfg.k);
  for (size_t i = 5; i < 9; ++i)
    EXPECT_DOUBLE_EQ(moe::perf::expert_flops(cases[i].cfg, cases[i].T * cases[i].cfg.k), b1_flops);
}

TEST(BenchPerf, ParamBytesMatchTheLayersParameters) {
  // The --quick cases are small enough to build; every expert kind and noise mode appears.
  for (const BenchCase& c : moe::perf::bench_cases(true)) {
    if (c.cfg.n_experts > 64) continue;
    moe::MoELayer layer(c.cfg);
    int64_t bytes = 0;
    for (const auto& name : layer.parameter_names())
      bytes += layer.param(name).numel() * static_cast<int64_t>(sizeof(float));
    EXPECT_EQ(moe::perf::layer_param_bytes(c.cfg), bytes) << c.name;
  }
}

TEST(BenchPerf, GemmRateIsPositiveAndFinite) {
  const auto g = moe::perf::measure_sgemm_dnnl(8, 16, 32, 1);
  EXPECT_TRUE(std::isfinite(g.gflops));
  EXPECT_GT(g.gflops, 0.0);
  const auto b = moe::perf::measure_read_bandwidth(int64_t{1} << 20, 1);
  EXPECT_EQ(b.bytes, int64_t{1} << 20);
  EXPECT_GT(b.bytes_per_s, 0.0);
}

}  // namespace
