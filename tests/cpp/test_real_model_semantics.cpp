// The layer semantics that real checkpoints need (issue 13): group_score max (DeepSeek-V2),
// a fixed selection bias (selection_bias, DeepSeek-V3's e_score_correction_bias), shared
// experts of their own width (shared_d_ff), the clamped SwiGLU experts of GPT-OSS
// (clamped_swiglu) and the experts alone with the caller's routing (forward_routed). Each
// against the float64 reference twin (layer/layer_ref.hpp), fp32 and bf16, and the new
// formula's gradient against central differences in double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include <unistd.h>

#include "moe/checkpoint.hpp"
#include "test_layer_util.hpp"

using moe::ExpertKind;
using moe::MoEConfig;
using moe::MoELayer;
using moe::Precision;
using moe_test::Rng;
using moe_test::rel_max_err;
using Ref = moe::detail::RefParams<double>;
using Saved = moe::detail::RefSaved<double>;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "(no error)";
}

MoEConfig base_config(ExpertKind kind, uint64_t seed) {
  MoEConfig c;
  c.d_model = 12;
  c.n_experts = 6;
  c.k = 2;
  c.expert = kind;
  c.d_ff = 10;
  c.d_out = 9;
  c.activation = moe::Activation::gelu;
  c.noise = moe::Noise::none;
  c.aux_alpha = 0.1f;
  c.z_alpha = 0.01f;
  c.router_bias = true;
  c.router_init_std = 1.0f;
  c.seed = seed;
  return c;
}

// Fast forward + backward of a randomised layer against the twin in double on the same
// routing inputs; fp32 within float rounding, bf16 within the rounded-operand oracle's bounds.
// sel: the selection bias set on the layer and given to the twin.
void check_against_reference(const MoEConfig& cfg, uint64_t seed, int64_t T,
                             const std::vector<float>& sel = {}) {
  MoELayer L(cfg);
  Rng rng(seed);
  moe_test::randomize(L, rng);
  if (!sel.empty()) L.expert_bias().data = sel;
  const auto x = rng.vec(T * cfg.d_model, 1.5);
  const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
  std::vector<float> y(static_cast<size_t>(T * cfg.out_dim())), dx(x.size());
  L.zero_grad();
  L.forward(y.data(), x.data(), T);
  L.backward(dx.data(), dy.data());

  const Ref p = Ref::from(L);
  Saved sv;
  std::vector<double> yr, dxr;
  const auto xd = moe_test::convert<double>(x);
  moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), p, cfg, T, true, nullptr, 0, 0,
                                         sel.empty() ? nullptr : sel.data());
  ASSERT_EQ(L.routing().indices, sv.indices);
  Ref g = Ref::zeros_like(L);
  const auto dyd = moe_test::convert<double>(dy);
  moe::detail::layer_backward_ref<double>(dxr, g, dyd.data(), sv, p, cfg);
  if (cfg.precision == Precision::fp32) {
    moe_test::expect_close(y, yr, 1e-5, 1e-4, "y");
    moe_test::expect_close(dx, dxr, 3e-5, 3e-4, "dx");
    for (const auto& name : L.parameter_names())
      moe_test::expect_close(L.grad(name).data, g.get(name), 3e-5, 3e-4, "d" + name, 0.0);
  } else {
    EXPECT_LE(rel_max_err(y, yr), 1e-3) << "y";
    EXPECT_LE(rel_max_err(dx, dxr), 5e-3) << "dx";
    for (const auto& name : L.parameter_names()) {
      const auto& want = g.get(name);
      if (std::all_of(want.begin(), want.end(), [](double v) { return v == 0.0; })) continue;
      EXPECT_LE(rel_max_err(L.grad(name).data, want), 5e-3) << "d" << name;
    }
  }
}

}  // namespace

// ---- config -------------------------------------------------------------------------------

TEST(RealModelConfig, NewFieldsRoundTripThroughJson) {
  MoEConfig c = base_config(ExpertKind::clamped_swiglu, 3);
  c.n_groups = 3;
  c.topk_groups = 2;
  c.group_score = moe::GroupScore::max;
  c.selection_bias = true;
  c.n_shared_experts = 2;
  c.shared_d_ff = 7;
  c.swiglu_alpha = 1.5f;
  c.swiglu_limit = 6.25f;
  const std::string j = moe::config_to_json(c);
  const MoEConfig r = moe::config_from_json(j);
  EXPECT_EQ(r.expert, ExpertKind::clamped_swiglu);
  EXPECT_EQ(r.group_score, moe::GroupScore::max);
  EXPECT_TRUE(r.selection_bias);
  EXPECT_EQ(r.shared_d_ff, 7);
  EXPECT_EQ(r.swiglu_alpha, 1.5f);
  EXPECT_EQ(r.swiglu_limit, 6.25f);
  EXPECT_EQ(moe::config_to_json(r), j);
  EXPECT_NE(j.find("\"group_score\":\"max\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"swiglu_alpha\":1.5"), std::string::npos) << j;
  // Defaults: today's behaviour.
  const MoEConfig d = moe::config_from_json(R"({"d_model":4,"n_experts":2,"k":1})");
  EXPECT_EQ(d.group_score, moe::GroupScore::top2_sum);
  EXPECT_FALSE(d.selection_bias);
  EXPECT_EQ(d.shared_d_ff, 0);
  EXPECT_EQ(d.swiglu_alpha, 1.702f);
  EXPECT_EQ(d.swiglu_limit, 7.0f);
  EXPECT_EQ(c.router().group_score, moe::GroupScore::max);
}

// docs/errors.md rows RM1 and RM2 (C++ column).
TEST(Errors, RM1_RealModelFieldsNamed) {
  auto err = [](auto mutate) {
    MoEConfig c = base_config(ExpertKind::clamped_swiglu, 1);
    mutate(c);
    return error_of([&] { c.validate(); });
  };
  EXPECT_EQ(err([](MoEConfig& c) { c.swiglu_alpha = 0.0f; }),
            "swiglu_alpha: must be finite and > 0, got 0");
  EXPECT_EQ(err([](MoEConfig& c) { c.swiglu_limit = -1.0f; }),
            "swiglu_limit: must be finite and > 0, got -1");
  EXPECT_EQ(err([](MoEConfig& c) { c.shared_d_ff = -2; }),
            "shared_d_ff: must be >= 0 (0 means d_ff), got -2");
  EXPECT_EQ(err([](MoEConfig& c) { c.shared_d_ff = 8; }),
            "shared_d_ff: needs n_shared_experts > 0, got shared_d_ff 8");
  EXPECT_EQ(err([](MoEConfig& c) {
              c.expert = ExpertKind::linear_relu;
              c.n_shared_experts = 1;
              c.shared_d_ff = 8;
            }),
            "shared_d_ff: linear_relu experts have no hidden width, got shared_d_ff 8");
  EXPECT_EQ(error_of([] { moe::parse_group_score("sum"); }),
            "group_score: unknown value 'sum' (expected top2_sum or max)");
  EXPECT_EQ(err([](MoEConfig& c) {
              c.router_kind = moe::RouterKind::expert_choice;
              c.capacity_factor = 1.0;
            }),
            "expert 'clamped_swiglu': not supported with router 'expert_choice' (not combined "
            "with expert choice yet)");
  EXPECT_NE(error_of([] { moe::config_from_json(R"({"d_model":4,"n_experts":2,"k":1,
                                                   "group_score":"top3"})"); })
                .find("group_score: unknown value 'top3'"),
            std::string::npos);
}

TEST(Errors, RM2_ForwardRoutedNamesTheToken) {
  MoEConfig c = base_config(ExpertKind::mlp, 2);
  MoELayer L(c);
  const int64_t T = 3, k = 2;
  std::vector<float> x(T * 12, 0.25f), y(T * 9), w{0.5f, 0.5f, 1.0f, 0.0f, 0.3f, 0.7f};
  std::vector<int32_t> idx{0, 1, 2, 3, 4, 5};
  L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k);
  idx[3] = 6;
  EXPECT_EQ(error_of([&] { L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k); }),
            "indices: expert 6 at token 1 (slot 1) is outside 0..5");
  idx[3] = -1;
  EXPECT_EQ(error_of([&] { L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k); }),
            "indices: expert -1 at token 1 (slot 1) is outside 0..5");
  idx[3] = 3;
  w[4] = NAN;
  EXPECT_EQ(error_of([&] { L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k); }),
            "weights: non-finite value nan at token 2 (slot 0)");
  w[4] = 0.3f;
  x[13] = INFINITY;
  EXPECT_EQ(error_of([&] { L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k); }),
            "x: non-finite value at token 1");
  x[13] = 0.25f;
  EXPECT_EQ(error_of([&] { L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), 0); }),
            "k: must be at least 1, got 0");
  // The layer's backward does not go back through it (backward_routed does).
  std::vector<float> dx(x.size());
  L.forward(y.data(), x.data(), T);
  L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k);
  EXPECT_EQ(error_of([&] { L.backward(dx.data(), y.data()); }),
            "backward: called before forward (no saved state)");
  std::vector<float> dw(T * k);
  L.forward(y.data(), x.data(), T);
  EXPECT_EQ(error_of([&] { L.backward_routed(dx.data(), dw.data(), y.data()); }),
            "backward_routed: called before forward_routed (no saved state)");
}

// ---- group_score ----------------------------------------------------------------------------

TEST(RealModelLayer, GroupScoreMaxAgainstTheTwin) {
  for (auto kind : {moe::RouterKind::softmax_topk, moe::RouterKind::sigmoid})
    for (auto prec : {Precision::fp32, Precision::bf16}) {
      MoEConfig c = base_config(ExpertKind::swiglu, 11);
      c.n_experts = 8;
      c.k = 3;
      c.router_kind = kind;
      c.renormalize = kind == moe::RouterKind::sigmoid;
      c.scaling_factor = 1.5f;
      c.n_groups = 4;
      c.topk_groups = 2;
      c.group_score = moe::GroupScore::max;
      c.precision = prec;
      SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(prec));
      check_against_reference(c, 21, 29);
    }
  // The two scores choose differently on these inputs (else the option did nothing).
  MoEConfig a = base_config(ExpertKind::mlp, 12);
  a.n_experts = 8;
  a.n_groups = 4;
  a.topk_groups = 1;
  MoEConfig b = a;
  b.group_score = moe::GroupScore::max;
  MoELayer La(a), Lb(b);
  Rng rng(5);
  moe_test::randomize(La, rng);
  for (const auto& n : La.parameter_names()) Lb.param(n).data = La.param(n).data;
  const int64_t T = 64;
  const auto x = rng.vec(T * 12, 1.0);
  std::vector<float> y(T * 9);
  La.forward(y.data(), x.data(), T);
  Lb.forward(y.data(), x.data(), T);
  EXPECT_NE(La.routing().indices, Lb.routing().indices);
}

// ---- selection_bias -------------------------------------------------------------------------

TEST(RealModelLayer, FixedSelectionBiasChoosesAndNeverMoves) {
  MoEConfig c = base_config(ExpertKind::swiglu, 13);
  c.n_experts = 8;
  c.k = 2;
  c.router_kind = moe::RouterKind::sigmoid;
  c.renormalize = true;
  c.scaling_factor = 2.5f;
  c.n_groups = 4;
  c.topk_groups = 2;
  c.selection_bias = true;
  Rng rb(9);
  const std::vector<float> sel = rb.vec(8, 0.3);
  for (auto prec : {Precision::fp32, Precision::bf16}) {
    c.precision = prec;
    SCOPED_TRACE(moe::to_string(prec));
    check_against_reference(c, 31, 33, sel);
  }
  c.precision = Precision::fp32;
  // The bias steers the selection (against the same layer without it), and a training step
  // with update_expert_bias leaves it as it was (rate 0).
  MoELayer L(c);
  Rng rng(4);
  moe_test::randomize(L, rng);
  const int64_t T = 40;
  const auto x = rng.vec(T * 12, 1.0);
  std::vector<float> y(T * 9);
  L.forward(y.data(), x.data(), T);
  const auto unbiased = L.routing().indices;
  L.expert_bias().data = {0, 0, 0, 0, 0, 0, 5.0f, 5.0f};
  L.forward(y.data(), x.data(), T);
  EXPECT_NE(L.routing().indices, unbiased);
  for (int64_t t = 0; t < T; ++t) EXPECT_GE(L.routing().indices[t * 2], 6);
  L.update_expert_bias();
  EXPECT_EQ(L.expert_bias().data, (std::vector<float>{0, 0, 0, 0, 0, 0, 5.0f, 5.0f}));
  // Without selection_bias the same state is ignored (today's behaviour).
  MoEConfig off = c;
  off.selection_bias = false;
  MoELayer L2(off);
  for (const auto& n : L.parameter_names()) L2.param(n).data = L.param(n).data;
  L2.expert_bias().data = L.expert_bias().data;
  L2.forward(y.data(), x.data(), T);
  EXPECT_EQ(L2.routing().indices, unbiased);
}

TEST(RealModelLayer, CheckpointKeepsTheFixedSelectionBias) {
  MoEConfig c = base_config(ExpertKind::mlp, 14);
  c.router_kind = moe::RouterKind::sigmoid;
  c.selection_bias = true;
  MoELayer a(c);
  a.expert_bias().data = {0.5f, -0.25f, 0.0f, 1.0f, 2.0f, -3.0f};
  const std::string path =
      testing::TempDir() + "/selection_bias_" + std::to_string(getpid()) + ".safetensors";
  moe::save_checkpoint(a, path);
  const MoEConfig rc = moe::read_checkpoint_config(path);
  EXPECT_TRUE(rc.selection_bias);
  MoELayer b(rc);
  moe::load_checkpoint(b, path);
  EXPECT_EQ(b.expert_bias().data, a.expert_bias().data);
  std::remove(path.c_str());
}

// ---- shared_d_ff ----------------------------------------------------------------------------

TEST(RealModelLayer, SharedExpertsOfTheirOwnWidth) {
  for (auto kind : {ExpertKind::mlp, ExpertKind::swiglu, ExpertKind::clamped_swiglu})
    for (auto prec : {Precision::fp32, Precision::bf16})
      for (bool gate : {false, true}) {
        MoEConfig c = base_config(kind, 15);
        c.router_kind = moe::RouterKind::softmax_topk;
        c.n_shared_experts = kind == ExpertKind::swiglu ? 1 : 2;
        c.shared_d_ff = 14;
        c.shared_gate = gate;
        c.swiglu_limit = 0.75f;  // the clamps bite on these activations
        c.precision = prec;
        SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(prec) +
                     (gate ? " gated" : ""));
        MoELayer L(c);
        EXPECT_EQ(L.param("Ws1").shape, (std::vector<int64_t>{c.n_shared_experts, 12, 14}));
        EXPECT_EQ(L.param("Ws2").shape, (std::vector<int64_t>{c.n_shared_experts, 14, 9}));
        if (kind != ExpertKind::mlp) {
          EXPECT_EQ(L.param("Ws3").shape, (std::vector<int64_t>{c.n_shared_experts, 12, 14}));
        }
        if (kind == ExpertKind::clamped_swiglu) {
          EXPECT_EQ(L.param("bs3").shape, (std::vector<int64_t>{c.n_shared_experts, 14}));
        }
        EXPECT_EQ(L.param("W1").shape, (std::vector<int64_t>{6, 12, 10}));  // routed: d_ff
        check_against_reference(c, 41, 19);
      }
}

// ---- clamped_swiglu -------------------------------------------------------------------------

TEST(RealModelLayer, ClampedSwigluParameters) {
  MoEConfig c = base_config(ExpertKind::clamped_swiglu, 16);
  std::vector<std::string> want{"W_g", "b_g", "W1", "b1", "W2", "b2", "W3", "b3"};
  EXPECT_EQ(MoELayer(c).parameter_names(), want);
  c.expert_bias = false;
  want = {"W_g", "b_g", "W1", "W2", "W3"};
  EXPECT_EQ(MoELayer(c).parameter_names(), want);
}

// Hand-computed: one expert, d = d_ff = d_out = 1, so that each pre-activation is a number.
TEST(RealModelLayer, ClampedSwigluByHand) {
  MoEConfig c;
  c.d_model = 1;
  c.n_experts = 1;
  c.k = 1;
  c.expert = ExpertKind::clamped_swiglu;
  c.d_ff = 1;
  c.noise = moe::Noise::none;
  c.swiglu_alpha = 1.702f;
  c.swiglu_limit = 7.0f;
  MoELayer L(c);
  L.param("W1").data = {2.0f};
  L.param("b1").data = {0.5f};
  L.param("W3").data = {-3.0f};
  L.param("b3").data = {0.25f};
  L.param("W2").data = {1.5f};
  L.param("b2").data = {-0.125f};
  auto expect_out = [&](float xv) {
    const double a1 = 2.0 * xv + 0.5, a3 = -3.0 * xv + 0.25;
    const double g = std::min(a1, 7.0), u = std::clamp(a3, -7.0, 7.0);
    const double h = (u + 1.0) * g / (1.0 + std::exp(-1.702 * g));
    float y = 0.0f;
    L.forward(&y, &xv, 1, moe::ForwardOptions{false});
    EXPECT_NEAR(y, 1.5 * h - 0.125, 1e-5 * (1.0 + std::abs(1.5 * h))) << "x = " << xv;
  };
  expect_out(0.3f);   // inside both clamps
  expect_out(4.0f);   // gate clamped at 7, up clamped at -7
  expect_out(-4.0f);  // up clamped at +7, gate negative
}

TEST(RealModelLayer, ClampedSwigluAgainstTheTwin) {
  int n = 0;
  for (float limit : {7.0f, 0.6f})
    for (bool bias : {true, false})
      for (auto prec : {Precision::fp32, Precision::bf16})
        for (int cap = 0; cap < 2; ++cap) {
          MoEConfig c = base_config(ExpertKind::clamped_swiglu, 17 + n);
          c.swiglu_limit = limit;
          c.swiglu_alpha = limit < 1.0f ? 1.25f : 1.702f;
          c.expert_bias = bias;
          c.precision = prec;
          if (cap) {
            c.capacity_factor = 0.75;
            c.drop_policy = moe::DropPolicy::probs;
            c.residual = true;
            c.d_out = 12;
          }
          SCOPED_TRACE("limit " + std::to_string(limit) + (bias ? " bias " : " nobias ") +
                       moe::to_string(prec) + (cap ? " capacity" : " dropless"));
          check_against_reference(c, 51 + n++, 37);
          if (::testing::Test::HasFatalFailure()) return;
        }
}

// The twin's backward of the new kind against central differences of the twin's forward in
// double, the clamps' kinks kept away from the sampled points.
TEST(RealModelGradCheck, ClampedSwigluDouble) {
  for (int variant = 0; variant < 3; ++variant) {
    MoEConfig c = base_config(ExpertKind::clamped_swiglu, 61 + variant);
    c.d_model = 4;
    c.n_experts = 4;
    c.d_ff = 5;
    c.d_out = 3;
    c.swiglu_limit = 0.5f;
    c.swiglu_alpha = 1.702f;
    c.aux_alpha = 0.3f;
    c.z_alpha = 0.05f;
    if (variant == 1) {
      c.n_shared_experts = 2;
      c.shared_d_ff = 3;
      c.shared_gate = true;
    }
    if (variant == 2) {
      c.capacity_factor = 1.0;
      c.k = 1;
    }
    SCOPED_TRACE("variant " + std::to_string(variant));
    const int64_t T = 6, E = c.n_experts, k = c.k, F = c.hidden();
    MoELayer L(c);
    Ref p;
    std::vector<double> x, r;
    Saved sv;
    auto objective = [&](Saved& s) {
      std::vector<double> y;
      moe::detail::layer_forward_ref<double>(y, s, x.data(), p, c, T, true, nullptr);
      double obj = s.aux_loss + s.z_loss;
      for (size_t i = 0; i < y.size(); ++i) obj += r[i] * y[i];
      return obj;
    };
    // Margin: top-k gaps and every routed pre-activation's distance from its clamp bounds.
    auto margin_of = [&](const Saved& s) {
      double m = 1e9;
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> row(s.H.begin() + t * E, s.H.begin() + (t + 1) * E);
        std::sort(row.rbegin(), row.rend());
        if (k < E) m = std::min(m, row[k - 1] - row[k]);
      }
      const double Lm = c.swiglu_limit;
      int64_t clamped = 0;
      for (int64_t a = 0; a < T * k; ++a)
        if (s.plan.src_to_dest[a] >= 0)
          for (int64_t f = 0; f < F; ++f) {
            const double a1 = s.a1[a * F + f], a3 = s.a3[a * F + f];
            m = std::min({m, std::abs(a1 - Lm), std::abs(a3 - Lm), std::abs(a3 + Lm)});
            clamped += a1 > Lm || std::abs(a3) > Lm;
          }
      return clamped > 0 ? m : 0.0;  // a sample must exercise the clamps
    };
    double margin = 0.0;
    for (int attempt = 0; attempt < 400 && margin < 1e-3; ++attempt) {
      Rng rng(1000 * variant + attempt);
      moe_test::randomize(L, rng);
      p = Ref::from(L);
      x = moe_test::convert<double>(rng.vec(T * c.d_model, 1.5));
      r = moe_test::convert<double>(rng.vec(T * c.out_dim(), 1.0));
      objective(sv);
      margin = margin_of(sv);
    }
    ASSERT_GE(margin, 1e-3) << "no sample away from every kink";
    // The shared experts' pre-activations are not in sv: a failed difference there shows as
    // a mismatch, and the margin above makes one unlikely at h = 1e-6.
    const auto idx0 = sv.indices;
    const auto s2d0 = sv.plan.src_to_dest;
    Ref g = Ref::zeros_like(L);
    std::vector<double> dx;
    moe::detail::layer_backward_ref<double>(dx, g, r.data(), sv, p, c);
    auto same = [&](const Saved& s) { return s.indices == idx0 && s.plan.src_to_dest == s2d0; };
    auto check = [&](std::vector<double>& v, const std::vector<double>& an,
                     const std::string& what) {
      const int64_t nz = moe_test::central_differences<Saved>(v, an, what, objective, same,
                                                              1e-6, 1e-5, 1e-7);
      EXPECT_GE(nz, static_cast<int64_t>(v.size()) / 5) << what << ": too few non-zero";
    };
    check(x, dx, "dx");
    for (const auto& n : L.parameter_names()) check(p.get(n), g.get(n), "d" + n);
  }
}

// ---- forward_routed -------------------------------------------------------------------------

// The routing a forward chose, fed back in, gives that forward's output: bit for bit.
TEST(RealModelRouted, RoutingOfAForwardGivesItsOutput) {
  for (auto kind : {ExpertKind::linear_relu, ExpertKind::mlp, ExpertKind::swiglu,
                    ExpertKind::clamped_swiglu})
    for (auto prec : {Precision::fp32, Precision::bf16}) {
      MoEConfig c = base_config(kind, 71);
      c.router_kind = moe::RouterKind::softmax_topk;
      c.k = 3;
      c.swiglu_limit = 1.0f;
      c.precision = prec;
      SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(prec));
      MoELayer L(c);
      Rng rng(72);
      moe_test::randomize(L, rng);
      const int64_t T = 45;
      const auto x = rng.vec(T * 12, 1.5);
      std::vector<float> y(T * 9), yr(T * 9);
      L.forward(y.data(), x.data(), T, moe::ForwardOptions{false});
      const auto idx = L.routing().indices;
      const auto w = L.routing().weights;
      L.forward_routed(yr.data(), x.data(), T, idx.data(), w.data(), 3);
      EXPECT_EQ(yr, y);
      EXPECT_TRUE(std::any_of(y.begin(), y.end(), [](float v) { return v != 0.0f; }));
    }
}

// Any routing, any k (repeated experts, zero and negative weights): against the twin's
// experts one assignment at a time.
TEST(RealModelRouted, AnyRoutingAgainstTheTwin) {
  for (auto kind : {ExpertKind::mlp, ExpertKind::swiglu, ExpertKind::clamped_swiglu})
    for (auto prec : {Precision::fp32, Precision::bf16})
      for (int64_t k : {1, 4}) {
        MoEConfig c = base_config(kind, 81);
        c.n_shared_experts = 1;  // not part of forward_routed
        c.residual = true;       // nor is the residual
        c.d_out = 12;
        c.swiglu_limit = 1.0f;
        c.precision = prec;
        SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(prec) + " k=" +
                     std::to_string(k));
        MoELayer L(c);
        Rng rng(82 + k);
        moe_test::randomize(L, rng);
        const int64_t T = 23, E = 6, Do = 12;
        const auto x = rng.vec(T * 12, 1.5);
        std::vector<int32_t> idx(T * k);
        for (auto& v : idx) v = static_cast<int32_t>(rng.below(E));
        const auto w = rng.vec(T * k, 1.0);
        std::vector<float> y(T * Do);
        L.forward_routed(y.data(), x.data(), T, idx.data(), w.data(), k);

        // The twin: a layer config with k assignments, all kept, the routing given.
        MoEConfig rc = c;
        rc.k = k;
        rc.n_shared_experts = 0;
        rc.residual = false;
        const Ref p = Ref::from(L);
        Saved sv;
        std::vector<double> want(static_cast<size_t>(T * Do), 0.0);
        // One assignment per call: a single-expert view of the twin's experts.
        for (int64_t a = 0; a < T * k; ++a) {
          MoEConfig one = rc;
          one.n_experts = 1;
          one.k = 1;
          one.router_bias = false;
          Ref pe;
          const int64_t e = idx[a];
          auto slice = [&](const std::vector<double>& v, std::vector<double>& out) {
            if (v.empty()) return;
            const size_t per = v.size() / E;
            out.assign(v.begin() + e * per, v.begin() + (e + 1) * per);
          };
          pe.W_g.assign(12, 0.0);
          slice(p.W1, pe.W1);
          slice(p.b1, pe.b1);
          slice(p.W2, pe.W2);
          slice(p.b2, pe.b2);
          slice(p.W3, pe.W3);
          slice(p.b3, pe.b3);
          std::vector<double> ye;
          const auto xt = moe_test::convert<double>(
              std::vector<float>(x.begin() + (a / k) * 12, x.begin() + (a / k + 1) * 12));
          moe::detail::layer_forward_ref<double>(ye, sv, xt.data(), pe, one, 1, false, nullptr);
          for (int64_t col = 0; col < Do; ++col)
            want[(a / k) * Do + col] += static_cast<double>(w[a]) * ye[col];
        }
        if (prec == Precision::fp32)
          moe_test::expect_close(y, want, 2e-6, 2e-5, "y");
        else
          EXPECT_LE(rel_max_err(y, want), 1e-3);
      }
}

// backward_routed: with the routing of a forward fed back, the routed experts' gradients are
// those of the layer's own backward, bit for bit (the same rows, products and order), and
// dweights are the gate gradients ∂L/∂w = dy_t·E_i(x_t) computed from the expert outputs.
TEST(RealModelRouted, BackwardGivesTheLayersExpertGradients) {
  for (auto kind : {ExpertKind::mlp, ExpertKind::swiglu, ExpertKind::clamped_swiglu})
    for (auto prec : {Precision::fp32, Precision::bf16}) {
      MoEConfig c = base_config(kind, 91);
      c.router_kind = moe::RouterKind::softmax_topk;
      c.k = 3;
      c.aux_alpha = 0.0f;
      c.z_alpha = 0.0f;
      c.swiglu_limit = 1.0f;
      c.precision = prec;
      SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(prec));
      MoELayer L(c);
      Rng rng(92);
      moe_test::randomize(L, rng);
      const int64_t T = 31, k = 3;
      const auto x = rng.vec(T * 12, 1.5);
      const auto dy = rng.vec(T * 9, 1.0);
      std::vector<float> y(T * 9), yr(T * 9), dx(x.size()), dxr(x.size()), dw(T * k);
      L.zero_grad();
      L.forward(y.data(), x.data(), T);
      L.backward(dx.data(), dy.data());
      std::vector<std::vector<float>> want;
      const std::vector<std::string> experts =
          kind == ExpertKind::swiglu ? std::vector<std::string>{"W1", "W2", "W3"}
          : kind == ExpertKind::mlp  ? std::vector<std::string>{"W1", "b1", "W2", "b2"}
                                     : std::vector<std::string>{"W1", "b1", "W2", "b2", "W3", "b3"};
      for (const auto& n : experts) want.push_back(L.grad(n).data);
      for (const auto& g : want)
        EXPECT_TRUE(std::any_of(g.begin(), g.end(), [](float v) { return v != 0.0f; }));
      const auto idx = L.routing().indices;
      const auto w = L.routing().weights;
      L.zero_grad();
      L.forward_routed(yr.data(), x.data(), T, idx.data(), w.data(), k);
      EXPECT_EQ(yr, y);
      L.backward_routed(dxr.data(), dw.data(), dy.data());
      for (size_t i = 0; i < experts.size(); ++i)
        EXPECT_EQ(L.grad(experts[i]).data, want[i]) << experts[i];
      EXPECT_EQ(L.grad("W_g").data, std::vector<float>(L.grad("W_g").data.size(), 0.0f));
      // dweights against the twin's expert outputs in double.
      const Ref p = Ref::from(L);
      Saved sv;
      std::vector<double> yd;
      const auto xd = moe_test::convert<double>(x);
      moe::detail::layer_forward_ref<double>(yd, sv, xd.data(), p, c, T, true, nullptr);
      ASSERT_EQ(sv.indices, idx);
      std::vector<double> dw_ref(T * k, 0.0);
      for (int64_t a = 0; a < T * k; ++a)
        for (int64_t col = 0; col < 9; ++col)
          dw_ref[a] += static_cast<double>(dy[(a / k) * 9 + col]) * sv.out[a * 9 + col];
      if (prec == Precision::fp32)
        moe_test::expect_close(dw, dw_ref, 2e-5, 2e-4, "dweights");
      else
        EXPECT_LE(rel_max_err(dw, dw_ref), 1e-3);
      // Once: the saved activations were used as scratch.
      EXPECT_EQ(error_of([&] { L.backward_routed(dxr.data(), dw.data(), dy.data()); }),
                "backward_routed: called before forward_routed (no saved state)");
    }
}
