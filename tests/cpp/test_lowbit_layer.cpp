// The low-bit precisions of the layer (SPEC §6: "int4", "mxfp4", "fp8"; evaluation only):
// the forward against the float64 twin on the values the stored bytes hold, with each
// product's rows rounded as the kernel the expert's row count selects does
// (experts/lowbit_ref.hpp; tight: 1e-3 of the largest output), for every expert kind, decode
// (few rows an expert) and prefill (many), capacity, shared experts; the same bits with and
// without masters; the quantizers of mxfp4 and fp8 against their definitions; and the
// errors. The kernels themselves: test_quant.cpp. Every level of the CPU: ctest's isa.*
// entries run this file under each MOE_MAX_ISA.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "experts/lowbit.hpp"
#include "layer/layer_ref.hpp"
#include "moe/checkpoint.hpp"
#include "moe/layer.hpp"
#include "quant/fp8.hpp"
#include "quant/mxfp4.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::MoEConfig;
using moe::MoELayer;
using moe::Precision;
using moe_test::Rng;

// f throws moe::Error whose message holds every part.
template <typename F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no error";
  } catch (const moe::Error& e) {
    for (const char* part : parts)
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

const char* const kExpertMatrices[] = {"W1", "W2", "W3", "Ws1", "Ws2", "Ws3"};

// The twin's parameters of a layer without masters: its fp32 parameters and the values its
// expert matrices hold.
moe::detail::RefParams<double> held_params(const MoELayer& L) {
  auto p = moe::detail::RefParams<double>::from(L);
  for (const char* n : kExpertMatrices) {
    moe::Tensor t;
    try {
      t = L.expert_matrix(n);
    } catch (const moe::Error&) {
      continue;  // not a matrix of this kind
    }
    p.get(n).assign(t.data.begin(), t.data.end());
  }
  return p;
}

struct Case {
  const char* name;
  Precision precision;
  int64_t group = 128;
  bool zero_points = false;
};
const Case kCases[] = {
    {"int4_g128", Precision::int4, 128, false},
    {"int4_g32_zp", Precision::int4, 32, true},
    {"mxfp4", Precision::mxfp4},
    {"fp8", Precision::fp8},
};

MoEConfig base_config(const Case& c, moe::ExpertKind kind) {
  MoEConfig cfg;
  cfg.d_model = 96;  // not a multiple of 128: partial blocks along K
  cfg.n_experts = 4;
  cfg.k = 2;
  cfg.expert = kind;
  cfg.d_ff = 160;
  cfg.activation = moe::Activation::gelu;
  cfg.expert_bias = kind != moe::ExpertKind::swiglu;
  cfg.noise = moe::Noise::none;
  cfg.router_init_std = 0.5f;
  cfg.precision = c.precision;
  cfg.int4_group = c.group;
  cfg.int4_zero_points = c.zero_points;
  return cfg;
}

// y of an evaluation forward of the layer (masters dropped) against the twin; returns the error.
double check_twin(const MoEConfig& cfg, int64_t T, uint64_t seed) {
  MoELayer L(cfg);
  Rng rng(seed);
  moe_test::randomize(L, rng);
  const auto x = rng.vec(T * cfg.d_model, 1.0);
  const auto with_masters = moe_test::eval_forward(L, x, T);
  L.drop_masters();
  const auto y = moe_test::eval_forward(L, x, T);
  EXPECT_EQ(y, with_masters) << "the layer without masters computes otherwise";
  const auto p = held_params(L);
  moe::detail::RefSaved<double> sv;
  std::vector<double> ry;
  const auto xd = moe_test::convert<double>(x);
  moe::detail::layer_forward_ref<double>(ry, sv, xd.data(), p, cfg, T, false, nullptr);
  EXPECT_EQ(L.routing().indices, sv.indices) << "the twin routed otherwise";
  const double err = moe_test::rel_max_err(y, ry);
  EXPECT_LE(err, 1e-3);
  return err;
}

}  // namespace

// Decode (T 1 and 5: a few rows an expert), prefill (T 40: ~20 rows an expert, above
// quant_method_for's decode limit on every path) and both in one call, every kind, every
// format.
TEST(LowbitLayer, MatchesTheTwinOnTheStoredValues) {
  double worst = 0.0;
  for (const Case& c : kCases)
    for (auto kind : {moe::ExpertKind::mlp, moe::ExpertKind::swiglu,
                      moe::ExpertKind::clamped_swiglu, moe::ExpertKind::linear_relu})
      for (int64_t T : {1, 5, 40}) {
        SCOPED_TRACE(std::string(c.name) + " " + moe::to_string(kind) + " T " + std::to_string(T));
        worst = std::max(worst, check_twin(base_config(c, kind), T, 11 + T));
      }
  RecordProperty("worst_rel_err", std::to_string(worst));
}

// Capacity (dropped assignments leave an expert fewer rows) and shared experts (every token
// a row of each: prefill at T 40).
TEST(LowbitLayer, CapacityAndSharedExperts) {
  for (const Case& c : kCases)
    for (int64_t T : {3, 40}) {
      SCOPED_TRACE(std::string(c.name) + " T " + std::to_string(T));
      MoEConfig cfg = base_config(c, moe::ExpertKind::swiglu);
      cfg.capacity_factor = 1.0;
      check_twin(cfg, T, 5);
      MoEConfig sh = base_config(c, moe::ExpertKind::mlp);
      sh.n_shared_experts = 2;
      sh.shared_d_ff = 64;
      check_twin(sh, T, 6);
    }
}

// The low-bit forward is close to the fp32 one: what 4 and 8 bits cost on these weights.
TEST(LowbitLayer, CloseToFp32) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    MoEConfig cfg = base_config(c, moe::ExpertKind::swiglu);
    MoEConfig c32 = cfg;
    c32.precision = Precision::fp32;
    MoELayer L(cfg), F(c32);
    Rng rng(3);
    moe_test::randomize(F, rng);
    for (const auto& n : F.parameter_names()) L.param(n).data = F.param(n).data;
    Rng xr(4);
    const auto x = xr.vec(16 * cfg.d_model, 1.0);
    const double err = moe_test::rel_fro(moe_test::eval_forward(L, x, 16),
                                         moe_test::eval_forward(F, x, 16));
    EXPECT_LE(err, c.precision == Precision::fp8 ? 0.06 : 0.25);
    EXPECT_GT(err, 0.0);  // the weights were quantized
    RecordProperty(std::string(c.name) + "_vs_fp32", std::to_string(err));
  }
}

TEST(LowbitLayer, EvaluationOnlyAndConfigErrors) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    MoELayer L(base_config(c, moe::ExpertKind::mlp));
    std::vector<float> x(2 * 96, 0.5f), y(2 * 96), dx(2 * 96);
    moe::ForwardOptions train;
    expect_error([&] { L.forward(y.data(), x.data(), 2, train); },
                           {"precision: '", "' is for evaluation only; a training forward"});
    moe::ForwardOptions eval;
    eval.training = false;
    L.forward(y.data(), x.data(), 2, eval);
    expect_error([&] { L.backward(dx.data(), y.data()); },
                           {"is for evaluation only; backward needs fp32 or bf16"});
  }
  MoEConfig bad = base_config(kCases[0], moe::ExpertKind::mlp);
  bad.int4_group = 48;
  expect_error([&] { bad.validate(); }, {"int4_group: must be 32, 64 or 128, got 48"});
  expect_error([] { moe::parse_precision("int3"); },
                         {"precision: unknown value 'int3'", "int4, mxfp4 or fp8"});
  // The int4 options travel with the config (JSON) only where they mean something.
  MoEConfig c = base_config(kCases[1], moe::ExpertKind::mlp);
  const MoEConfig back = moe::config_from_json(moe::config_to_json(c));
  EXPECT_EQ(back.int4_group, 32);
  EXPECT_TRUE(back.int4_zero_points);
  EXPECT_EQ(moe::config_to_json(base_config(kCases[2], moe::ExpertKind::mlp)).find("int4"),
            std::string::npos);
}

// MXFP4 as the OCP MX specification quantizes: scale 2^(⌊log2 amax⌋ − 2), nearest E2M1 value
// with ties to the even code, saturation at ±6.
TEST(LowbitQuantizers, Mxfp4FollowsTheDefinition) {
  using moe::detail::quant_value_at;
  // One column, K 64: block 0 holds amax 6 (scale 1), block 1 amax 0.75 (scale 2^-3).
  std::vector<float> W(64, 0.0f);
  const float b0[] = {6.0f, 5.0f, 2.5f, 0.25f, -0.75f, 1.25f, -7.0f, 0.0f};
  for (int i = 0; i < 8; ++i) W[static_cast<size_t>(i)] = b0[i];
  W[32] = 0.75f;
  W[33] = 0.3f;
  const auto q = moe::detail::quantize_mxfp4(W.data(), 64, 1);
  const auto m = q.view();
  // 6 → 6; 5 (between 4 and 6: a tie) → 4 (even code); 2.5 (tie of 2 and 3) → 2; 0.25 (tie of 0
  // and 0.5) → 0; −0.75 (tie of 0.5 and 1) → −1; 1.25 (tie of 1 and 1.5) → 1; −7 → −6.
  const double want0[] = {6.0, 4.0, 2.0, 0.0, -1.0, 1.0, -6.0, 0.0};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(quant_value_at(m, i, 0), want0[i]) << i;
  EXPECT_EQ(q.scales[0], 127);
  EXPECT_EQ(q.scales[1], 127 - 3);  // ⌊log2 0.75⌋ − 2 = −3
  EXPECT_EQ(quant_value_at(m, 32, 0), 0.75);
  EXPECT_EQ(quant_value_at(m, 33, 0), 0.25);  // 0.3 / 2^-3 = 2.4 → 2
}

TEST(LowbitQuantizers, Fp8FollowsTheDefinition) {
  using moe::detail::e4m3_code;
  using moe::detail::e4m3_value;
  EXPECT_EQ(e4m3_value(e4m3_code(448.0f)), 448.0f);
  EXPECT_EQ(e4m3_value(e4m3_code(1000.0f)), 448.0f);   // saturated
  EXPECT_EQ(e4m3_value(e4m3_code(-1.0f)), -1.0f);
  EXPECT_EQ(e4m3_value(e4m3_code(1.0625f)), 1.0f);     // tie of 1 and 1.125 → even code
  EXPECT_EQ(e4m3_value(e4m3_code(1.1875f)), 1.25f);    // tie of 1.125 and 1.25 → even code
  EXPECT_EQ(e4m3_value(e4m3_code(0.0009f)), 0.0f);     // below half the smallest subnormal
  EXPECT_EQ(e4m3_value(e4m3_code(0.001f)), 0.001953125f);  // above it: 2^-9
  EXPECT_EQ(e4m3_value(e4m3_code(0.0029296875f)), 0.00390625f);  // 1.5 · 2^-9: tie → 2^-8 (even)
  // Every code's value maps back to the code (finite ones).
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN
    if (c == 0x80) continue;           // −0 reads as +0's code
    EXPECT_EQ(e4m3_code(e4m3_value(c)), c) << c;
  }
  // Block scales: max |w| / 448 per 128 × 128 block; a zero block keeps 1.
  Rng rng(2);
  const int64_t K = 200, N = 130;
  auto W = rng.vec(K * N, 3.0);
  for (int64_t k = 128; k < K; ++k)
    for (int64_t j = 128; j < N; ++j) W[static_cast<size_t>(k * N + j)] = 0.0f;
  const auto q = moe::detail::quantize_fp8(W.data(), K, N);
  float amax = 0.0f;
  for (int64_t k = 0; k < 128; ++k)
    for (int64_t j = 0; j < 128; ++j) amax = std::max(amax, std::fabs(W[static_cast<size_t>(k * N + j)]));
  EXPECT_EQ(q.scale_inv[0], amax / 448.0f);
  EXPECT_EQ(q.scale_inv[3], 1.0f);
  double num = 0.0, den = 0.0;
  const auto m = q.view();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) {
      const double w = W[static_cast<size_t>(k * N + j)];
      num += std::pow(moe::detail::quant_value_at(m, k, j) - w, 2);
      den += w * w;
    }
  EXPECT_LE(std::sqrt(num / den), 0.04);  // E4M3: 3 mantissa bits
}

// Checkpoints of a low-bit layer hold its bytes (codes, scales, zero points) and the layout:
// a layer loads them as they are (the same forward, bit for bit), one with masters taking
// their values as masters too. A file of another precision is refused naming both.
TEST(LowbitLayer, CheckpointsHoldTheBytes) {
  const std::string dir = ::testing::TempDir();
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    for (bool shared : {false, true}) {
      MoEConfig cfg = base_config(c, moe::ExpertKind::clamped_swiglu);
      if (shared) cfg.n_shared_experts = 1;
      MoELayer L(cfg);
      Rng rng(9);
      moe_test::randomize(L, rng);
      const auto x = rng.vec(20 * cfg.d_model, 1.0);
      const auto want = moe_test::eval_forward(L, x, 20);
      const std::string a = dir + "/lowbit_" + c.name + "_a.safetensors";
      moe::save_checkpoint(L, a);
      moe::LayerOptions held;
      held.masters = false;
      MoELayer N(cfg, held);
      moe::load_checkpoint(N, a);
      EXPECT_EQ(moe_test::eval_forward(N, x, 20), want) << "without masters";
      // Saved again from the bytes it holds: the same file content, the same forward.
      const std::string b = dir + "/lowbit_" + c.name + "_b.safetensors";
      moe::save_checkpoint(N, b);
      MoELayer N2(cfg, held);
      moe::load_checkpoint(N2, b);
      EXPECT_EQ(moe_test::eval_forward(N2, x, 20), want) << "saved from the bytes";
      MoELayer M(cfg);
      moe::load_checkpoint(M, a);
      EXPECT_EQ(moe_test::eval_forward(M, x, 20), want) << "with masters";
      M.drop_masters();  // keeps the file's bytes (not quantized again)
      EXPECT_EQ(moe_test::eval_forward(M, x, 20), want) << "masters dropped";
    }
    // Another precision's layer is refused, naming both.
    MoEConfig other = base_config(c, moe::ExpertKind::clamped_swiglu);
    other.precision = c.precision == Precision::fp8 ? Precision::mxfp4 : Precision::fp8;
    MoELayer O(other);
    const std::string stored = moe::to_string(c.precision);
    expect_error([&] { moe::load_checkpoint(O, dir + "/lowbit_" + c.name + "_a.safetensors"); },
                 {".codes' holds ", " weights (a checkpoint of precision '",
                  "build the layer with precision '"});
  }
  // An fp32 checkpoint loads into a low-bit layer (quantized on the way).
  MoEConfig c32 = base_config(kCases[0], moe::ExpertKind::mlp);
  c32.precision = Precision::fp32;
  MoELayer F(c32);
  const std::string f = dir + "/lowbit_fp32.safetensors";
  moe::save_checkpoint(F, f);
  moe::LayerOptions held;
  held.masters = false;
  MoELayer Q(base_config(kCases[0], moe::ExpertKind::mlp), held);
  moe::load_checkpoint(Q, f);
  MoELayer Qm(base_config(kCases[0], moe::ExpertKind::mlp));
  for (const auto& n : F.parameter_names()) Qm.param(n).data = F.param(n).data;
  Rng xr(1);
  const auto x = xr.vec(8 * 96, 1.0);
  EXPECT_EQ(moe_test::eval_forward(Q, x, 8), moe_test::eval_forward(Qm, x, 8));
}
