// The MoE layer forward: the reference's worked example, capacity and both drop policies,
// configuration errors, awkward shapes, and the fast layer against its reference twin on
// every expert kind × k × capacity/policy × residual × noise.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_layer_util.hpp"

using moe::MoEConfig;
using moe::MoELayer;
using moe_test::Rng;

namespace {

void set(MoELayer& L, const std::string& n, std::vector<float> v) {
  ASSERT_EQ(static_cast<int64_t>(v.size()), L.param(n).numel()) << n;
  L.param(n).data = std::move(v);
}

std::string error_of(const MoEConfig& cfg) {
  try {
    cfg.validate();
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// x = [0.8, 0.6], W_g = [[1, 0, -1], [0, 1, 1]], k = 2, linear_relu experts: expert 1 is
// the identity, expert 2 swaps the two coordinates. h = [0.8, 0.6, -0.2], so the gates are
// softmax([0.8, 0.6]) = [0.550, 0.450] on experts 1 and 2 and the output is
// 0.550·[0.8, 0.6] + 0.450·[0.6, 0.8] = [0.710, 0.690].
TEST(LayerReference, WorkedExample) {
  MoEConfig cfg;
  cfg.d_model = 2;
  cfg.n_experts = 3;
  cfg.k = 2;
  cfg.expert = moe::ExpertKind::linear_relu;
  cfg.expert_bias = false;
  cfg.noise = moe::Noise::none;
  MoELayer L(cfg);
  EXPECT_EQ(L.parameter_names(), (std::vector<std::string>{"W_g", "W1"}));
  set(L, "W_g", {1, 0, -1, 0, 1, 1});
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Expert 3 is poisoned: had it run on any row, the output would not be finite.
  set(L, "W1", {1, 0, 0, 1, /**/ 0, 1, 1, 0, /**/ nan, nan, nan, nan});
  const std::vector<float> x{0.8f, 0.6f};
  std::vector<float> y(2);
  L.forward(y.data(), x.data(), 1);
  const auto gates = L.routing().dense_gates();
  EXPECT_NEAR(gates[0], 0.550, 5e-4);
  EXPECT_NEAR(gates[1], 0.450, 5e-4);
  EXPECT_EQ(gates[2], 0.0f);
  EXPECT_NEAR(y[0], 0.710, 5e-4);
  EXPECT_NEAR(y[1], 0.690, 5e-4);
  // Exact values: σ(0.2) and 1 - σ(0.2).
  const double g0 = 1.0 / (1.0 + std::exp(-0.2));
  EXPECT_NEAR(y[0], g0 * 0.8 + (1 - g0) * 0.6, 1e-6);
  EXPECT_NEAR(y[1], g0 * 0.6 + (1 - g0) * 0.8, 1e-6);
  EXPECT_EQ(L.stats().experts_evaluated, 2);
  EXPECT_EQ(L.stats().load_after, (std::vector<int64_t>{1, 1, 0}));
  EXPECT_EQ(L.stats().dropped_assignments, 0);
  EXPECT_EQ(L.stats().capacity, -1);
}

TEST(LayerCapacity, CapacityFormula) {
  MoEConfig cfg;
  cfg.d_model = 4;
  cfg.n_experts = 2;
  cfg.k = 1;
  EXPECT_EQ(cfg.capacity(8), -1);  // dropless
  cfg.capacity_factor = 1.0;
  EXPECT_EQ(cfg.capacity(8), 4);
  EXPECT_EQ(cfg.capacity(9), 5);  // ceil(4.5)
  EXPECT_EQ(cfg.capacity(0), 0);
  cfg.n_experts = 1;
  cfg.capacity_factor = 1.1;
  EXPECT_EQ(cfg.capacity(10), 11);  // 1.1·10 is 11.000000000000002 in binary
  cfg.n_experts = 3;
  cfg.k = 2;
  cfg.capacity_factor = 1.25;
  EXPECT_EQ(cfg.capacity(7), 6);  // 2·7/3·1.25 = 5.83
  cfg.capacity_factor = 0.01;
  EXPECT_EQ(cfg.capacity(1), 1);
}

namespace {

// T = 8 tokens, E = 2, all preferring expert 0 with distinct margins; cf = 1 → C = 4.
struct CapacitySetup {
  MoEConfig cfg;
  std::vector<float> x;
  CapacitySetup(int64_t k, double cf, moe::DropPolicy pol, bool residual) {
    cfg.d_model = 2;
    cfg.n_experts = 2;
    cfg.k = k;
    cfg.expert = moe::ExpertKind::linear_relu;
    cfg.expert_bias = false;
    cfg.noise = moe::Noise::none;
    cfg.capacity_factor = cf;
    cfg.drop_policy = pol;
    cfg.residual = residual;
    // x_t = (1 + a_t, 1): logits h = (x0, x1) so every token prefers expert 0, by a_t.
    const float a[8] = {0.3f, 1.9f, 0.7f, 0.1f, 2.5f, 1.1f, 0.5f, 1.5f};
    for (float v : a) {
      x.push_back(1.0f + v);
      x.push_back(1.0f);
    }
  }
  MoELayer layer() const {
    MoELayer L(cfg);
    L.param("W_g").data = {1, 0, 0, 1};
    L.param("W1").data = {1, 0, 0, 1, /**/ 2, 0, 0, 2};  // expert 0: identity; expert 1: 2·I
    return L;
  }
};

}  // namespace

TEST(LayerCapacity, PositionKeepsTheFirstFour) {
  for (bool residual : {false, true}) {
    CapacitySetup s(1, 1.0, moe::DropPolicy::position, residual);
    MoELayer L = s.layer();
    std::vector<float> y(16);
    L.forward(y.data(), s.x.data(), 8);
    const auto& st = L.stats();
    EXPECT_EQ(st.capacity, 4);
    EXPECT_EQ(st.load_before, (std::vector<int64_t>{8, 0}));
    EXPECT_EQ(st.load_after, (std::vector<int64_t>{4, 0}));
    EXPECT_EQ(st.dropped_assignments, 4);
    EXPECT_EQ(st.dropped_tokens, 4);
    for (int t = 0; t < 8; ++t)
      for (int c = 0; c < 2; ++c) {
        const float xv = s.x[t * 2 + c];
        // Kept: gate 1 times the identity expert (+ x); dropped: 0 (or x).
        const float want = t < 4 ? xv + (residual ? xv : 0.0f) : (residual ? xv : 0.0f);
        EXPECT_FLOAT_EQ(y[t * 2 + c], want) << "token " << t << " residual " << residual;
      }
  }
}

TEST(LayerCapacity, ProbsWithOneExpertPerTokenFallsBackToTokenOrder) {
  // With k = 1 every gate is softmax over one kept logit = 1: all tie, and ties go to the
  // lower token index, so `probs` keeps the same four tokens as `position`.
  CapacitySetup s(1, 1.0, moe::DropPolicy::probs, false);
  MoELayer L = s.layer();
  std::vector<float> y(16);
  L.forward(y.data(), s.x.data(), 8);
  for (int t = 0; t < 8; ++t) EXPECT_EQ(y[t * 2] != 0.0f, t < 4) << "token " << t;
}

TEST(LayerCapacity, ProbsKeepsTheLargestGates) {
  // k = 2, cf = 0.5: C = ceil(2·8/2·0.5) = 4. Every token's first choice is expert 0 with
  // gate σ(a_t); `probs` keeps the four largest a_t (tokens 4, 1, 7, 5) at expert 0, while
  // `position` keeps tokens 0..3. Expert 1 holds second choices, the first four of them
  // under `position` and the four largest 1 - σ(a_t) (tokens 3, 0, 6, 2) under `probs`.
  for (auto pol : {moe::DropPolicy::position, moe::DropPolicy::probs})
    for (bool residual : {false, true}) {
      CapacitySetup s(2, 0.5, pol, residual);
      MoELayer L = s.layer();
      std::vector<float> y(16);
      L.forward(y.data(), s.x.data(), 8);
      EXPECT_EQ(L.stats().capacity, 4);
      EXPECT_EQ(L.stats().load_after, (std::vector<int64_t>{4, 4}));
      const bool probs = pol == moe::DropPolicy::probs;
      const std::vector<int> keep0 = probs ? std::vector<int>{1, 4, 5, 7} : std::vector<int>{0, 1, 2, 3};
      const std::vector<int> keep1 = probs ? std::vector<int>{0, 2, 3, 6} : std::vector<int>{0, 1, 2, 3};
      EXPECT_EQ(L.stats().dropped_tokens, probs ? 0 : 4);
      const auto& w = L.routing().weights;
      for (int t = 0; t < 8; ++t) {
        const bool k0 = std::find(keep0.begin(), keep0.end(), t) != keep0.end();
        const bool k1 = std::find(keep1.begin(), keep1.end(), t) != keep1.end();
        for (int c = 0; c < 2; ++c) {
          const float xv = s.x[t * 2 + c];
          const float want = (residual ? xv : 0.0f) + (k0 ? w[t * 2] * xv : 0.0f) +
                             (k1 ? w[t * 2 + 1] * 2.0f * xv : 0.0f);
          EXPECT_NEAR(y[t * 2 + c], want, 1e-6) << "token " << t << " policy " << moe::to_string(pol);
        }
      }
    }
}

TEST(LayerConfig, ValidateNamesTheField) {
  MoEConfig ok;
  ok.d_model = 4;
  ok.n_experts = 3;
  ok.k = 2;
  EXPECT_EQ(error_of(ok), "");
  auto bad = [&](auto mutate, const std::string& field) {
    MoEConfig c = ok;
    mutate(c);
    const std::string msg = error_of(c);
    EXPECT_NE(msg.find(field), std::string::npos) << "message '" << msg << "' should name " << field;
    EXPECT_THROW(MoELayer{c}, moe::Error);
  };
  bad([](MoEConfig& c) { c.k = 0; }, "k:");
  bad([](MoEConfig& c) { c.k = 4; }, "got 4");
  bad([](MoEConfig& c) { c.n_experts = 0; }, "n_experts");
  bad([](MoEConfig& c) { c.d_model = 0; }, "d_model");
  bad([](MoEConfig& c) { c.capacity_factor = 0.0; }, "capacity_factor");
  bad([](MoEConfig& c) { c.capacity_factor = -1.5; }, "-1.5");
  bad([](MoEConfig& c) { c.residual = true, c.d_out = 3; }, "residual");
  bad([](MoEConfig& c) { c.noise_stddev = -1.0f; }, "noise_stddev");
  bad([](MoEConfig& c) { c.d_ff = -2; }, "d_ff");
  bad([](MoEConfig& c) { c.aux_alpha = -0.1f; }, "aux_alpha");
  bad([](MoEConfig& c) { c.router_init_std = std::nanf(""); }, "router_init_std");
  EXPECT_THROW(moe::parse_expert_kind("moe"), moe::Error);
  EXPECT_EQ(moe::parse_expert_kind("swiglu"), moe::ExpertKind::swiglu);
  EXPECT_EQ(moe::parse_activation(moe::to_string(moe::Activation::gelu)), moe::Activation::gelu);
  EXPECT_EQ(moe::parse_drop_policy("probs"), moe::DropPolicy::probs);
  EXPECT_THROW(moe::parse_drop_policy("random!"), moe::Error);
}

TEST(LayerParams, NamesShapesAndInit) {
  MoEConfig c;
  c.d_model = 8;
  c.n_experts = 4;
  c.k = 2;
  c.expert = moe::ExpertKind::mlp;
  c.d_ff = 16;
  c.d_out = 5;
  c.router_bias = true;
  MoELayer L(c);
  EXPECT_EQ(L.parameter_names(),
            (std::vector<std::string>{"W_g", "b_g", "W_noise", "W1", "b1", "W2", "b2"}));
  EXPECT_EQ(L.param("W1").shape, (std::vector<int64_t>{4, 8, 16}));
  EXPECT_EQ(L.param("W2").shape, (std::vector<int64_t>{4, 16, 5}));
  EXPECT_EQ(L.param("b2").shape, (std::vector<int64_t>{4, 5}));
  EXPECT_THROW(L.param("W3"), moe::Error);
  for (float v : L.param("W_g").data) EXPECT_EQ(v, 0.0f);  // Shazeer et al.: router at zero
  for (float v : L.param("b1").data) EXPECT_EQ(v, 0.0f);
  // W1 ~ N(0, 1/d): the sample variance of 512 draws is close to 1/8.
  double ss = 0;
  for (float v : L.param("W1").data) ss += double(v) * v;
  EXPECT_NEAR(ss / 512.0, 1.0 / 8.0, 0.03);
  // Same seed, same parameters; another seed, others.
  MoELayer L2(c);
  EXPECT_EQ(L.param("W2").data, L2.param("W2").data);
  c.seed = 1;
  MoELayer L3(c);
  EXPECT_NE(L.param("W2").data, L3.param("W2").data);
  c.router_init_std = 0.1f;
  MoELayer L4(c);
  EXPECT_NE(L4.param("W_noise").data, std::vector<float>(32, 0.0f));

  c.expert = moe::ExpertKind::swiglu;
  c.noise = moe::Noise::fixed;
  c.router_bias = false;
  EXPECT_EQ(MoELayer(c).parameter_names(), (std::vector<std::string>{"W_g", "W1", "W2", "W3"}));
  c.expert = moe::ExpertKind::linear_relu;
  EXPECT_EQ(MoELayer(c).param("W1").shape, (std::vector<int64_t>{4, 8, 5}));
}

TEST(LayerErrors, BoundaryChecks) {
  MoEConfig c;
  c.d_model = 3;
  c.n_experts = 2;
  c.k = 1;
  MoELayer L(c);
  std::vector<float> dx(3), dy(3);
  EXPECT_THROW(L.backward(dx.data(), dy.data()), moe::Error);
  L.param("W1") = moe::Tensor({2, 3});  // wrong shape
  std::vector<float> x(3, 1.0f), y(3);
  try {
    L.forward(y.data(), x.data(), 1);
    ADD_FAILURE() << "expected an error";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("W1"), std::string::npos) << e.what();
  }
  MoELayer L2(c);
  x[1] = std::nanf("");
  EXPECT_THROW(L2.forward(y.data(), x.data(), 1), moe::Error);
}

TEST(LayerShapes, EmptyBatch) {
  MoEConfig c;
  c.d_model = 3;
  c.n_experts = 2;
  c.k = 2;
  c.capacity_factor = 1.0;
  MoELayer L(c);
  L.forward(nullptr, nullptr, 0);
  EXPECT_EQ(L.stats().tokens, 0);
  EXPECT_EQ(L.stats().experts_evaluated, 0);
  EXPECT_EQ(L.aux_loss(), 0.0);
  L.backward(nullptr, nullptr);
  for (const auto& n : L.parameter_names())
    for (float v : L.grad(n).data) EXPECT_EQ(v, 0.0f);
}

// The fast layer against the double reference twin, forward and stats, on the whole matrix.
TEST(LayerFastVsRef, ForwardEveryConfiguration) {
  int n = 0;
  for (const auto& cs : moe_test::all_cases())
    for (int64_t T : {0, 1, 13, 37}) {
      SCOPED_TRACE(cs.name() + " T=" + std::to_string(T));
      const int64_t E = cs.k == 1 ? 4 : 5;
      MoEConfig cfg = moe_test::config_of(cs, 7, E, 9, 6, 11 + n);
      MoELayer L(cfg);
      Rng rng(1000 + n++);
      moe_test::randomize(L, rng);
      const auto x = rng.vec(T * 7, 1.0);
      std::vector<float> y(static_cast<size_t>(T * cfg.out_dim()));
      moe::ForwardOptions opt;
      opt.step = 3;
      opt.token_offset = 5;
      L.forward(y.data(), x.data(), T, opt);

      using Ref = moe::detail::RefParams<double>;
      const Ref p = Ref::from(L);
      moe::detail::RefSaved<double> sv;
      std::vector<double> yr;
      const auto xd = moe_test::convert<double>(x);
      const auto eps = moe_test::convert<double>(L.routing().eps);
      moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), p, cfg, T, true,
                                             eps.empty() ? nullptr : eps.data());
      ASSERT_EQ(L.routing().indices, sv.indices);
      // ReLU experts under a tight capacity legitimately leave many zeros.
      const double guard = T == 1 ? 0.0 : cs.kind == moe::ExpertKind::linear_relu ? 0.15 : 0.3;
      moe_test::expect_close(y, yr, 2e-5, 2e-4, "y", guard);
      const auto& st = L.stats();
      EXPECT_EQ(st.tokens, T);
      EXPECT_EQ(st.capacity, cfg.capacity(T));
      EXPECT_EQ(st.load_before, sv.plan.load_before);
      EXPECT_EQ(st.load_after, sv.plan.load_after);
      EXPECT_EQ(st.dropped_assignments, T * cfg.k - sv.plan.n_kept);
      EXPECT_EQ(st.dropped_tokens, sv.plan.dropped_tokens);
      int64_t evaluated = 0;
      for (int64_t v : sv.plan.load_after) evaluated += v > 0;
      EXPECT_EQ(st.experts_evaluated, evaluated);
      EXPECT_NEAR(st.aux_loss, sv.aux_loss, 1e-6 + 1e-5 * sv.aux_loss);
      EXPECT_NEAR(st.z_loss, sv.z_loss, 1e-6 + 1e-5 * sv.z_loss);
      if (T > 0) {
        EXPECT_GT(sv.aux_loss, 0.0);
      }
      if (::testing::Test::HasFailure()) return;
    }
}

// Evaluation: no noise, whatever the configuration, and the same routing as the reference
// without ε.
TEST(LayerFastVsRef, EvaluationHasNoNoise) {
  moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::relu, 2, 1.0,
                    moe::DropPolicy::position, true, moe::Noise::learned,
                    moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 6, 4, 8, 6, 3);
  MoELayer L(cfg);
  Rng rng(5);
  moe_test::randomize(L, rng);
  const auto x = rng.vec(20 * 6, 1.0);
  std::vector<float> y1(x.size()), y2(x.size());
  moe::ForwardOptions opt;
  opt.training = false;
  L.forward(y1.data(), x.data(), 20, opt);
  EXPECT_TRUE(L.routing().eps.empty());
  opt.step = 7;
  L.forward(y2.data(), x.data(), 20, opt);
  EXPECT_EQ(y1, y2);
  opt.training = true;
  L.forward(y2.data(), x.data(), 20, opt);
  EXPECT_NE(y1, y2);
}

// Experts that receive nothing, k = E, E = 1, widths off any GEMM tile.
TEST(LayerFastVsRef, AwkwardShapes) {
  struct Shape {
    int64_t T, d, E, k, F, Do;
  };
  const Shape shapes[] = {{1, 1, 1, 1, 1, 1},     {5, 3, 3, 3, 2, 4},  {200, 65, 8, 2, 257, 33},
                          {130, 17, 16, 1, 5, 3}, {3, 4, 12, 2, 6, 5}, {70, 1, 2, 2, 300, 1}};
  int n = 0;
  for (const auto& s : shapes)
    for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu}) {
      SCOPED_TRACE("shape " + std::to_string(n) + " " + moe::to_string(kind));
      moe_test::Case cs{kind, moe::Activation::gelu, s.k, std::nullopt,
                        moe::DropPolicy::position, false, moe::Noise::fixed,
                        moe::NoiseScale::softplus};
      MoEConfig cfg = moe_test::config_of(cs, s.d, s.E, s.F, s.Do, 7);
      MoELayer L(cfg);
      Rng rng(77 + n++);
      moe_test::randomize(L, rng);
      const auto x = rng.vec(s.T * s.d, 1.0);
      std::vector<float> y(static_cast<size_t>(s.T * s.Do));
      L.forward(y.data(), x.data(), s.T);
      using Ref = moe::detail::RefParams<double>;
      moe::detail::RefSaved<double> sv;
      std::vector<double> yr;
      const auto xd = moe_test::convert<double>(x);
      const auto eps = moe_test::convert<double>(L.routing().eps);
      moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), Ref::from(L), cfg, s.T, true,
                                             eps.data());
      // Dead ReLUs with a single output column can leave many zeros: relax the guard there.
      moe_test::expect_close(y, yr, 3e-5, 3e-4, "y", s.T * s.Do < 8 ? 0.0 : s.Do == 1 ? 0.1 : 0.3);
      if (s.E > s.T * s.k) {
        EXPECT_LT(L.stats().experts_evaluated, s.E);
      }
    }
}

// The reference twin on float agrees with itself on double (both instantiations are used:
// float as a cheap oracle, double for the gradient checks).
TEST(LayerReference, FloatTwinMatchesDouble) {
  moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::relu, 2, 1.0,
                    moe::DropPolicy::probs, true, moe::Noise::learned, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 6, 5, 7, 6, 2);
  MoELayer L(cfg);
  Rng rng(12);
  moe_test::randomize(L, rng);
  const int64_t T = 17;
  const auto x = rng.vec(T * 6, 1.0);
  const auto eps = rng.vec(T * 5, 1.0);
  const auto dy = rng.vec(T * 6, 1.0);
  moe::detail::RefSaved<float> sf;
  moe::detail::RefSaved<double> sd;
  std::vector<float> yf, dxf;
  std::vector<double> yd, dxd;
  const auto pf = moe::detail::RefParams<float>::from(L);
  const auto pd = moe::detail::RefParams<double>::from(L);
  moe::detail::layer_forward_ref<float>(yf, sf, x.data(), pf, cfg, T, true, eps.data());
  const auto xd = moe_test::convert<double>(x), ed = moe_test::convert<double>(eps),
             dyd = moe_test::convert<double>(dy);
  moe::detail::layer_forward_ref<double>(yd, sd, xd.data(), pd, cfg, T, true, ed.data());
  ASSERT_EQ(sf.indices, sd.indices);
  moe_test::expect_close(yf, yd, 2e-5, 2e-4, "y");
  auto gf = moe::detail::RefParams<float>::zeros_like(L);
  auto gd = moe::detail::RefParams<double>::zeros_like(L);
  moe::detail::layer_backward_ref<float>(dxf, gf, dy.data(), sf, pf, cfg);
  moe::detail::layer_backward_ref<double>(dxd, gd, dyd.data(), sd, pd, cfg);
  moe_test::expect_close(dxf, dxd, 5e-5, 5e-4, "dx");
  for (const auto& n : L.parameter_names())
    moe_test::expect_close(gf.get(n), gd.get(n), 5e-5, 5e-4, "d" + n, 0.0);
}
