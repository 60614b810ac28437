// Expert-choice routing (router "expert_choice"): a hand-worked example with a tie and a
// token no expert chose, capacity edge cases (C capped at T, T = 1, T = 0), the selection
// against its stable-sort reference, the fast forward against the double reference twin,
// central-difference gradients of every parameter and x, thread invariance, and the options
// that expert choice refuses.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "layer/expert_choice_ref.hpp"
#include "router/expert_choice.hpp"
#include "test_layer_util.hpp"

using moe::MoEConfig;
using moe::MoELayer;
using moe_test::Rng;
using Ref = moe::detail::RefParams<double>;
using EcSaved = moe::detail::ExpertChoiceRefSaved<double>;

namespace {

MoEConfig ec_config(moe::ExpertKind kind, moe::Activation act, int64_t d, int64_t E, int64_t k,
                    std::optional<double> cf) {
  MoEConfig cfg;
  cfg.d_model = d;
  cfg.n_experts = E;
  cfg.k = k;
  cfg.expert = kind;
  cfg.activation = act;
  cfg.d_ff = 5;
  cfg.capacity_factor = cf;
  cfg.noise = moe::Noise::none;
  cfg.router_kind = moe::RouterKind::expert_choice;
  return cfg;
}

struct EcRun {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;
};

EcRun run(MoELayer& L, const std::vector<float>& x, const std::vector<float>& dy, int64_t T,
        const moe::ForwardOptions& opt = {}) {
  EcRun r;
  r.y.resize(static_cast<size_t>(T * L.config().out_dim()));
  r.dx.resize(x.size());
  L.zero_grad();
  L.forward(r.y.data(), x.data(), T, opt);
  L.backward(r.dx.data(), dy.data());
  for (const auto& n : L.parameter_names()) r.grads.push_back(L.grad(n).data);
  return r;
}

}  // namespace

// 4 tokens, 2 experts, k = 1, no capacity factor: C = ceil(1·4·1/2) = 2. W_g = I so h = x.
// Tokens 2 and 3 score (0.5, 0.5) for both experts: the tie goes to the lower token, so token
// 2 is chosen by both experts and token 3 by none.
TEST(ExpertChoice, HandExample) {
  for (bool residual : {false, true}) {
    MoEConfig cfg = ec_config(moe::ExpertKind::linear_relu, moe::Activation::relu, 2, 2, 1,
                              std::nullopt);
    cfg.residual = residual;
    MoELayer L(cfg);
    L.param("W_g").data = {1, 0, 0, 1};
    L.param("W1").data = {1, 0, 0, 1, /* expert 1 swaps */ 0, 1, 1, 0};
    L.param("b1").data = {0, 0, 0, 0};
    const std::vector<float> x = {2, 0, 0, 2, 1, 1, 0, 0};
    std::vector<float> y(8);
    L.forward(y.data(), x.data(), 4);
    const moe::RouterState& rs = L.routing();
    EXPECT_EQ(rs.ec_capacity, 2);
    EXPECT_EQ(rs.ec_tokens, (std::vector<int32_t>{0, 2, 1, 2}));
    const double s = 1.0 / (1.0 + std::exp(-2.0));  // softmax(2, 0)[0]
    const std::vector<double> gates = {s, 0.5, s, 0.5};
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(rs.ec_gates[i], gates[i], 1e-7);
    const double r = residual ? 1.0 : 0.0;
    const std::vector<double> want = {2 * s + 2 * r, 0,          2 * s,   2 * r,
                                      1 + r,         1 + r,      0,       0};
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(y[i], want[i], 1e-6) << i;
    const auto g = rs.dense_gates();
    const std::vector<float> dense = {static_cast<float>(s), 0, 0, static_cast<float>(s),
                                      0.5f, 0.5f, 0, 0};
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(g[i], dense[i], 1e-7) << i;
    const moe::MoEStats& st = L.stats();
    EXPECT_EQ(st.capacity, 2);
    EXPECT_EQ(st.load_after, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(st.dropped_tokens, 1);
    EXPECT_EQ(st.dropped_assignments, 0);
    EXPECT_EQ(st.experts_evaluated, 2);
    EXPECT_EQ(st.experts_per_token, (std::vector<int64_t>{1, 2, 1}));
    EXPECT_EQ(st.aux_loss, 0.0);  // balanced by construction: no balancing loss
  }
}

// C = ceil(k·T·cf/E) capped at T; T = 1 and T = 0 work forward and backward.
TEST(ExpertChoice, CapacityEdgeCases) {
  MoEConfig cfg = ec_config(moe::ExpertKind::mlp, moe::Activation::gelu, 3, 4, 2, std::nullopt);
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 10), 5);   // ceil(2·10/4)
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 3), 2);    // ceil(1.5)
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 0), 0);
  cfg.capacity_factor = 1.25;
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 10), 7);   // ceil(6.25)
  cfg.capacity_factor = 4.0;
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 3), 3);    // 6, capped at T
  EXPECT_EQ(moe::detail::expert_choice_capacity(cfg, 1), 1);

  // C = T: every expert takes every token, so the layer is a dense softmax-weighted MoE.
  for (int64_t T : {int64_t{3}, int64_t{1}}) {
    MoELayer L(cfg);
    Rng rng(3 + T);
    moe_test::randomize(L, rng);
    const auto x = rng.vec(T * 3, 1.0);
    const auto dy = rng.vec(T * 3, 1.0);
    const EcRun r = run(L, x, dy, T);
    EXPECT_EQ(L.stats().capacity, T);
    EXPECT_EQ(L.stats().experts_per_token, (std::vector<int64_t>{0, 0, 0, 0, T}));
    EXPECT_EQ(L.stats().dropped_tokens, 0);
    const Ref p = Ref::from(L);
    std::vector<double> yd(static_cast<size_t>(T * 3), 0.0), out(3);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(4, 0.0), S(4);
      for (int e = 0; e < 4; ++e)
        for (int i = 0; i < 3; ++i) h[e] += x[t * 3 + i] * p.W_g[i * 4 + e];
      moe::detail::softmax_row(S.data(), h.data(), 4);
      const auto xd = moe_test::convert<double>(std::vector<float>(x.begin() + t * 3, x.begin() + t * 3 + 3));
      for (int e = 0; e < 4; ++e) {
        moe::detail::expert_row_ref(out.data(), xd.data(), p, cfg, e);
        for (int c = 0; c < 3; ++c) yd[t * 3 + c] += S[e] * out[c];
      }
    }
    moe_test::expect_close(r.y, yd, 1e-6, 1e-5, "dense y");
    for (float v : r.dx) EXPECT_TRUE(std::isfinite(v));
  }

  MoELayer L(cfg);
  L.forward(nullptr, nullptr, 0);
  EXPECT_EQ(L.stats().capacity, 0);
  EXPECT_EQ(L.stats().experts_evaluated, 0);
  L.backward(nullptr, nullptr);
}

// The fast selection (nth_element + sort per expert, threads over experts) against a stable
// sort of each column, on scores with many exact ties.
TEST(ExpertChoice, SelectMatchesStableSort) {
  Rng rng(11);
  for (int64_t T : {1, 2, 7, 64, 301})
    for (int64_t E : {1, 3, 8}) {
      std::vector<float> S(static_cast<size_t>(T * E));
      for (auto& v : S) v = static_cast<float>(rng.below(5)) * 0.25f;  // ties everywhere
      for (int64_t C : {int64_t{1}, (T + 1) / 2, T}) {
        std::vector<int32_t> a(static_cast<size_t>(E * C)), b(a.size());
        std::vector<float> ga(a.size()), gb(a.size());
        std::vector<int32_t> scratch;
        moe::detail::expert_choice_select(a.data(), ga.data(), scratch, S.data(), T, E, C);
        moe::detail::expert_choice_select_ref(b.data(), gb.data(), S.data(), T, E, C);
        EXPECT_EQ(a, b) << "T " << T << " E " << E << " C " << C;
        EXPECT_EQ(ga, gb);
      }
    }
}

// Fast forward against the double reference twin, every expert kind, noise kinds, residual.
TEST(ExpertChoice, ForwardMatchesReference) {
  const std::pair<moe::ExpertKind, moe::Activation> kinds[] = {
      {moe::ExpertKind::linear_relu, moe::Activation::relu},
      {moe::ExpertKind::mlp, moe::Activation::silu},
      {moe::ExpertKind::swiglu, moe::Activation::relu}};
  int i = 0;
  for (auto [kind, act] : kinds)
    for (std::optional<double> cf : {std::optional<double>{}, std::optional<double>{0.5},
                                     std::optional<double>{2.0}})
      for (auto noise : {moe::Noise::none, moe::Noise::fixed, moe::Noise::learned}) {
        SCOPED_TRACE(i);
        MoEConfig cfg = ec_config(kind, act, 6, 5, 2, cf);
        cfg.noise = noise;
        cfg.residual = (i % 2) == 1;
        cfg.router_bias = (i % 3) == 0;
        cfg.z_alpha = 0.02f;
        ++i;
        MoELayer L(cfg);
        Rng rng(100 + i);
        moe_test::randomize(L, rng);
        const int64_t T = 23;
        const auto x = rng.vec(T * 6, 1.0);
        const auto eps = rng.vec(T * 5, 1.0);
        moe::ForwardOptions opt;
        opt.noise = eps.data();
        std::vector<float> y(static_cast<size_t>(T * cfg.out_dim()));
        L.forward(y.data(), x.data(), T, opt);
        std::vector<double> yr;
        EcSaved sv;
        const auto xd = moe_test::convert<double>(x);
        const auto ed = moe_test::convert<double>(eps);
        moe::detail::expert_choice_forward_ref<double>(yr, sv, xd.data(), Ref::from(L), cfg, T,
                                                       true, ed.data());
        ASSERT_EQ(L.routing().ec_tokens, sv.tokens);
        moe_test::expect_close(y, yr, 1e-5, 1e-4, "y", 0.2);
        EXPECT_NEAR(L.stats().z_loss, sv.z_loss, 1e-6);
        EXPECT_EQ(L.stats().aux_loss, 0.0);
      }
}

// Central differences of L = Σ r·y + z_loss on the double reference twin against the fast
// layer's float backward, for x and every parameter; samples are redrawn until each expert's
// C-th and (C+1)-th scores are further apart than the step can move them.
TEST(ExpertChoice, GradientsMatchCentralDifferences) {
  struct GCase {
    moe::ExpertKind kind;
    moe::Activation act;
    std::optional<double> cf;
    moe::Noise noise;
    bool residual;
  };
  const GCase cases[] = {
      {moe::ExpertKind::mlp, moe::Activation::gelu, std::nullopt, moe::Noise::none, false},
      {moe::ExpertKind::mlp, moe::Activation::silu, 0.75, moe::Noise::learned, true},
      {moe::ExpertKind::swiglu, moe::Activation::relu, 1.5, moe::Noise::fixed, false},
      {moe::ExpertKind::swiglu, moe::Activation::relu, std::nullopt, moe::Noise::learned, true}};
  const int64_t T = 7, d = 4, E = 3;
  int ci = 0;
  for (const GCase& gc : cases) {
    SCOPED_TRACE(ci++);
    MoEConfig cfg = ec_config(gc.kind, gc.act, d, E, 2, gc.cf);
    cfg.noise = gc.noise;
    cfg.noise_stddev = 0.7f;
    cfg.residual = gc.residual;
    cfg.router_bias = true;
    cfg.z_alpha = 0.05f;
    cfg.aux_alpha = 0.3f;  // reported and differentiated as 0 under expert choice
    MoELayer L(cfg);
    std::vector<float> x, eps, r;
    double margin = 0;
    for (int attempt = 0; attempt < 200 && margin < 2e-3; ++attempt) {
      Rng rng(77 * ci + attempt);
      moe_test::randomize(L, rng, 2.0);
      x = rng.vec(T * d, 1.0);
      eps = rng.vec(T * E, 1.5);
      r = rng.vec(T * cfg.out_dim(), 1.0);
      std::vector<double> yr;
      EcSaved sv;
      const auto xd = moe_test::convert<double>(x);
      const auto ed = moe_test::convert<double>(eps);
      moe::detail::expert_choice_forward_ref<double>(yr, sv, xd.data(), Ref::from(L), cfg, T,
                                                     true, ed.data());
      margin = 1e9;
      for (int64_t e = 0; e < E && sv.C < T; ++e) {
        std::vector<double> col(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) col[t] = sv.probs[t * E + e];
        std::sort(col.rbegin(), col.rend());
        margin = std::min(margin, col[sv.C - 1] - col[sv.C]);
      }
    }
    ASSERT_GE(margin, 2e-3) << "no sample with every choice away from its switching point";

    moe::ForwardOptions opt;
    opt.noise = eps.data();
    const EcRun fast = run(L, x, r, T, opt);
    EXPECT_EQ(L.stats().aux_loss, 0.0);

    Ref p = Ref::from(L);
    auto xd = moe_test::convert<double>(x);
    const auto ed = moe_test::convert<double>(eps);
    const auto rd = moe_test::convert<double>(r);
    EcSaved base;
    std::vector<double> y0;
    moe::detail::expert_choice_forward_ref<double>(y0, base, xd.data(), p, cfg, T, true,
                                                   ed.data());
    auto objective = [&](EcSaved& sv) {
      std::vector<double> y;
      moe::detail::expert_choice_forward_ref<double>(y, sv, xd.data(), p, cfg, T, true,
                                                     ed.data());
      double Lv = sv.z_loss;
      for (size_t i = 0; i < y.size(); ++i) Lv += rd[i] * y[i];
      return Lv;
    };
    auto check = [&](std::vector<double>& v, const std::vector<float>& an, const std::string& what) {
      const int64_t nonzero = moe_test::central_differences<EcSaved>(
          v, an, what, objective, [&](const EcSaved& s) { return s.tokens == base.tokens; },
          2e-5, 1e-4, 1e-6);
      EXPECT_GE(nonzero, static_cast<int64_t>(v.size()) / 4) << what << ": too few non-zero";
    };
    check(xd, fast.dx, "dx");
    const auto names = L.parameter_names();
    for (size_t n = 0; n < names.size(); ++n) {
      if (names[n] == "W_noise" && gc.noise != moe::Noise::learned) continue;
      check(p.get(names[n]), fast.grads[n], "d" + names[n]);
    }
  }
}

// Forward and backward give the same bits with 1 and 2 OpenMP threads.
TEST(ExpertChoice, OneAndTwoThreadsBitIdentical) {
  const int saved = omp_get_max_threads();
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu}) {
    SCOPED_TRACE(moe::to_string(kind));
    MoEConfig cfg = ec_config(kind, moe::Activation::silu, 70, 6, 2, 1.25);
    cfg.d_ff = 130;
    cfg.noise = moe::Noise::learned;
    cfg.residual = kind != moe::ExpertKind::linear_relu;
    cfg.router_bias = true;
    cfg.z_alpha = 0.01f;
    MoELayer L(cfg);
    Rng rng(8);
    moe_test::randomize(L, rng);
    const int64_t T = 300;
    const auto x = rng.vec(T * 70, 1.0);
    const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
    moe::ForwardOptions opt;
    opt.step = 4;
    omp_set_num_threads(1);
    const EcRun a = run(L, x, dy, T, opt);
    const auto tokens_a = L.routing().ec_tokens;
    omp_set_num_threads(2);
    const EcRun b = run(L, x, dy, T, opt);
    omp_set_num_threads(saved);
    EXPECT_EQ(tokens_a, L.routing().ec_tokens);
    EXPECT_EQ(a.y, b.y);
    EXPECT_EQ(a.dx, b.dx);
    const auto names = L.parameter_names();
    for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(a.grads[i], b.grads[i]) << names[i];
    EXPECT_GT(std::count_if(a.y.begin(), a.y.end(), [](float v) { return v != 0.0f; }),
              static_cast<long>(a.y.size() / 2));
  }
}

// Options without a meaning under expert choice are refused by name.
TEST(ExpertChoice, RefusesTokenChoiceOptions) {
  auto expect_refused = [](MoEConfig cfg, const char* name) {
    try {
      cfg.validate();
      ADD_FAILURE() << name << " accepted";
    } catch (const moe::Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("expert_choice"), std::string::npos) << e.what();
    }
  };
  const MoEConfig base = ec_config(moe::ExpertKind::mlp, moe::Activation::relu, 4, 4, 2, 1.0);
  EXPECT_NO_THROW(base.validate());
  MoEConfig c = base;
  c.drop_policy = moe::DropPolicy::probs;
  expect_refused(c, "drop_policy");
  c = base;
  c.aux_loss_kind = moe::AuxLossKind::seq;
  expect_refused(c, "aux_loss");
  c = base;
  c.aux_loss_kind = moe::AuxLossKind::none;
  EXPECT_NO_THROW(c.validate());
  c = base;
  c.n_groups = 2;
  expect_refused(c, "n_groups");
}
