// The layer on every kernel level this CPU allows, in one process (common/cpu.hpp's
// IsaOverride): avx2 (portable and widened kernels), avx512 (VNNI), avx512_bf16 (vdpbf16ps)
// and AMX through the tile emulation (on any CPU). Per level: bf16 forward and backward of
// every expert kind, shared experts and expert choice against the float64 twin on the same
// rounded operands; the same bits for 1 and 2 threads; int8 the same bits on every level
// (exact integer sums). The whole suite also runs under MOE_MAX_ISA=avx2 and avx512 (ctest's
// *.isa_* entries, tests/CMakeLists.txt).
#include <gtest/gtest.h>
#include <omp.h>

#include <string>
#include <vector>

#include "common/cpu.hpp"
#include "moe/layer.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::MoEConfig;
using moe::MoELayer;
using moe::Precision;
using namespace moe::detail;

struct Level {
  Isa isa;
  bool emulated;
  std::string name() const { return std::string(isa_name(isa)) + (emulated ? "+amx_emulated" : ""); }
};

// The levels this CPU can run: each up to cpu().best, and the AMX kernels emulated on top.
std::vector<Level> levels() {
  std::vector<Level> out;
  for (Isa i : {Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx})
    if (static_cast<int>(i) <= static_cast<int>(cpu().best)) out.push_back({i, false});
  out.push_back({cpu().best, true});
  return out;
}

MoEConfig small(moe::ExpertKind kind, Precision p) {
  moe_test::Case cs{kind, moe::Activation::silu, 2, std::nullopt, moe::DropPolicy::position,
                    false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig c = moe_test::config_of(cs, 40, 4, 72, 33, 7);
  c.precision = p;
  return c;
}

}  // namespace

// bf16 forward and backward on every level against the rounded-operand oracle: ~20 rows per
// expert (the AMX kernel) and a few experts with fewer than MOE_AMX_MIN_ROWS (the streaming
// one), widths off the tiles.
TEST(IsaLevels, Bf16LayerMatchesTheOracleOnEveryLevel) {
  for (const Level& lv : levels()) {
    IsaOverride guard(lv.isa, lv.emulated);
    double worst_y = 0.0, worst_g = 0.0;
    for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu,
                      moe::ExpertKind::clamped_swiglu}) {
      SCOPED_TRACE(lv.name() + " " + moe::to_string(kind));
      MoEConfig c = small(kind, Precision::bf16);
      moe_test::check_rounded_oracle(c, 41, 600, worst_y, worst_g);
      c.n_experts = 16;  // few rows per expert
      moe_test::check_rounded_oracle(c, 9, 601, worst_y, worst_g);
      if (::testing::Test::HasFailure()) return;
    }
    RecordProperty("worst_forward_" + lv.name(), std::to_string(worst_y));
    RecordProperty("worst_gradient_" + lv.name(), std::to_string(worst_g));
  }
}

// Shared experts and expert choice (their own product paths) on every level: bf16 against
// the same layer in fp32 within bf16's rounding (the float64 twin covers the routed layer;
// these paths are checked against their own references in fp32 elsewhere), and not fp32's
// bits (the bf16 products ran).
TEST(IsaLevels, SharedExpertsAndExpertChoiceOnEveryLevel) {
  MoEConfig shared = small(moe::ExpertKind::swiglu, Precision::fp32);
  shared.n_shared_experts = 2;
  shared.shared_gate = true;
  MoEConfig choice = small(moe::ExpertKind::mlp, Precision::fp32);
  choice.router_kind = moe::RouterKind::expert_choice;
  choice.capacity_factor = 1.0;
  choice.aux_loss_kind = moe::AuxLossKind::none;
  choice.z_alpha = 0.0f;
  for (const Level& lv : levels()) {
    IsaOverride guard(lv.isa, lv.emulated);
    for (const MoEConfig& c32 : {shared, choice}) {
      SCOPED_TRACE(lv.name() + (c32.n_shared_experts ? " shared" : " expert_choice"));
      MoEConfig c16 = c32;
      c16.precision = Precision::bf16;
      MoELayer L32(c32), L16(c16);
      moe_test::Rng rng(13);
      moe_test::randomize(L32, rng);
      for (const auto& name : L32.parameter_names()) L16.param(name).data = L32.param(name).data;
      const int64_t T = 37;
      const auto x = rng.vec(T * c32.d_model, 1.0), dy = rng.vec(T * c32.out_dim(), 1.0);
      moe::ForwardOptions opt;
      const auto a = moe_test::run_layer(L32, x, dy, T, opt), b = moe_test::run_layer(L16, x, dy, T, opt);
      ASSERT_EQ(L32.routing().indices, L16.routing().indices) << "the router is fp32 in both";
      EXPECT_LE(moe_test::rel_max_err(b.y, a.y), 2e-2);
      EXPECT_NE(b.y, a.y);
      EXPECT_LE(moe_test::rel_max_err(b.dx, a.dx), 2e-2);
      for (size_t i = 0; i < a.grads.size(); ++i)
        EXPECT_LE(moe_test::rel_max_err(b.grads[i], a.grads[i]), 3e-2) << L32.parameter_names()[i];
    }
  }
}

// Within each level, 1 and 2 threads give the same bits (forward, dx, every gradient).
TEST(IsaLevels, ThreadCountNeverChangesTheBits) {
  for (const Level& lv : levels()) {
    IsaOverride guard(lv.isa, lv.emulated);
    SCOPED_TRACE(lv.name());
    const MoEConfig c = small(moe::ExpertKind::swiglu, Precision::bf16);
    moe_test::LayerRun runs[2];
    for (int t = 0; t < 2; ++t) {
      omp_set_num_threads(t + 1);
      MoELayer L(c);
      moe_test::Rng rng(9);
      moe_test::randomize(L, rng);
      const auto x = rng.vec(50 * c.d_model, 1.0), dy = rng.vec(50 * c.out_dim(), 1.0);
      moe::ForwardOptions opt;
      runs[t] = moe_test::run_layer(L, x, dy, 50, opt);
    }
    omp_set_num_threads(2);
    EXPECT_EQ(runs[0].y, runs[1].y);
    EXPECT_EQ(runs[0].dx, runs[1].dx);
    EXPECT_EQ(runs[0].grads, runs[1].grads);
  }
}

// int8: exact integer sums on every kernel, so every level gives the same bits, for every
// expert kind.
TEST(IsaLevels, Int8SameBitsOnEveryLevel) {
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu,
                    moe::ExpertKind::clamped_swiglu}) {
    SCOPED_TRACE(moe::to_string(kind));
    const MoEConfig c = small(kind, Precision::int8);
    MoELayer L(c);
    moe_test::Rng rng(11);
    moe_test::randomize(L, rng);
    const auto x = rng.vec(45 * c.d_model, 1.0);
    std::vector<float> first;
    for (const Level& lv : levels()) {
      IsaOverride guard(lv.isa, lv.emulated);
      const auto y = moe_test::eval_forward(L, x, 45);
      if (first.empty())
        first = y;
      else
        EXPECT_EQ(y, first) << lv.name();
    }
  }
}

// MOE_MAX_ISA and the report: the level never exceeds what the CPU has; names parse back.
TEST(IsaLevels, LevelsParseAndNeverExceedTheCpu) {
  EXPECT_LE(static_cast<int>(cpu().level), static_cast<int>(cpu().best));
  for (Isa i : {Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx}) {
    Isa back;
    ASSERT_TRUE(parse_isa(isa_name(i), &back));
    EXPECT_EQ(back, i);
  }
  Isa none;
  EXPECT_FALSE(parse_isa("avx512bf16", &none));
  EXPECT_FALSE(parse_isa("", &none));
  {
    IsaOverride up(Isa::amx, false);  // never above the CPU
    EXPECT_EQ(cpu().level, cpu().best);
  }
  RecordProperty("cpu", cpu().model);
  RecordProperty("best", isa_name(cpu().best));
}
