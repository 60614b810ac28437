// The MoE layer backward: central differences in double on the reference twin for every
// parameter and dx of every expert kind (respecting the top-k kink and capacity decisions),
// the fast backward against the reference backward, gradient accumulation, dropped
// assignments, and bit-identical results with 1 and 2 OpenMP threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "test_layer_util.hpp"

using moe::MoEConfig;
using moe::MoELayer;
using moe_test::Rng;
using Ref = moe::detail::RefParams<double>;
using Saved = moe::detail::RefSaved<double>;

namespace {

// Smallest distance of any routing or capacity decision from its switching point, and of
// any ReLU input from its kink: central differences are only meaningful when a step of h
// cannot cross one of these.
double decision_margin(const Saved& sv, const MoEConfig& cfg) {
  const int64_t T = sv.T, E = cfg.n_experts, k = cfg.k;
  double m = 1e9;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> row(sv.H.begin() + t * E, sv.H.begin() + (t + 1) * E);
    std::sort(row.rbegin(), row.rend());
    if (k < E) m = std::min(m, row[k - 1] - row[k]);
  }
  const int64_t C = sv.plan.C;
  if (C >= 0 && cfg.drop_policy == moe::DropPolicy::probs)
    for (int64_t e = 0; e < E; ++e) {
      if (sv.plan.load_before[e] <= C) continue;
      std::vector<double> w;
      for (int64_t a = 0; a < T * k; ++a)
        if (sv.indices[a] == e) w.push_back(sv.weights[a]);
      std::sort(w.rbegin(), w.rend());
      m = std::min(m, w[C - 1] - w[C]);
    }
  const bool relu = cfg.expert == moe::ExpertKind::linear_relu ||
                    (cfg.expert == moe::ExpertKind::mlp && cfg.activation == moe::Activation::relu);
  if (relu) {
    const int64_t w = cfg.expert == moe::ExpertKind::linear_relu ? cfg.out_dim() : cfg.hidden();
    for (int64_t a = 0; a < T * k; ++a)
      if (sv.plan.src_to_dest[a] >= 0)
        for (int64_t c = 0; c < w; ++c) m = std::min(m, std::abs(sv.a1[a * w + c]));
  }
  return m;
}

// L = Σ r·y + aux_loss + z_loss: the objective whose gradient backward(dy = r) returns.
double objective(const std::vector<double>& x, const Ref& p, const MoEConfig& cfg, int64_t T,
                 const std::vector<double>& eps, const std::vector<double>& r, Saved& sv) {
  std::vector<double> y;
  moe::detail::layer_forward_ref<double>(y, sv, x.data(), p, cfg, T, true,
                                         eps.empty() ? nullptr : eps.data());
  double L = sv.aux_loss + sv.z_loss;
  for (size_t i = 0; i < y.size(); ++i) L += r[i] * y[i];
  return L;
}

void gradient_check(const moe_test::Case& cs, uint64_t seed) {
  const int64_t T = 6, d = 4, E = 4, F = 5, Do = 3;
  MoEConfig cfg = moe_test::config_of(cs, d, E, F, Do, seed);
  cfg.aux_alpha = 0.3f;  // large enough that its term is visible in every gradient
  cfg.z_alpha = 0.05f;
  MoELayer L(cfg);
  // Resample until every decision is far from its switching point.
  Ref p;
  std::vector<double> x, eps, r;
  Saved sv;
  double margin = 0;
  for (int attempt = 0; attempt < 200 && margin < 1e-3; ++attempt) {
    Rng rng(seed * 1000 + attempt);
    moe_test::randomize(L, rng);
    p = Ref::from(L);
    x = moe_test::convert<double>(rng.vec(T * d, 1.0));
    eps = cs.noise == moe::Noise::none ? std::vector<double>{}
                                       : moe_test::convert<double>(rng.vec(T * E, 1.5));
    r = moe_test::convert<double>(rng.vec(T * cfg.out_dim(), 1.0));
    objective(x, p, cfg, T, eps, r, sv);
    margin = decision_margin(sv, cfg);
  }
  ASSERT_GE(margin, 1e-3) << "no sample with every decision away from its kink";
  const auto indices0 = sv.indices;
  const auto s2d0 = sv.plan.src_to_dest;

  Ref g = Ref::zeros_like(L);
  std::vector<double> dx;
  moe::detail::layer_backward_ref<double>(dx, g, r.data(), sv, p, cfg);

  auto eval = [&](Saved& s) { return objective(x, p, cfg, T, eps, r, s); };
  // The step must not have crossed a decision (guaranteed by the margin; checked anyway).
  auto same = [&](const Saved& s) {
    return s.indices == indices0 && s.plan.src_to_dest == s2d0;
  };
  auto check = [&](std::vector<double>& v, const std::vector<double>& an, const std::string& what) {
    const int64_t nonzero =
        moe_test::central_differences<Saved>(v, an, what, eval, same, 1e-6, 1e-5, 1e-7);
    // Zero-trust: most entries of every gradient carry signal in these configurations.
    EXPECT_GE(nonzero, static_cast<int64_t>(v.size()) / 4) << what << ": too few non-zero";
  };
  check(x, dx, "dx");
  for (const auto& n : L.parameter_names()) check(p.get(n), g.get(n), "d" + n);
}

}  // namespace

TEST(LayerGradCheck, EveryExpertKindDouble) {
  using moe::Noise;
  using moe::NoiseScale;
  using moe::DropPolicy;
  struct Variant {
    int64_t k;
    std::optional<double> cf;
    DropPolicy pol;
    bool residual;
    Noise noise;
    NoiseScale scale;
  };
  const Variant variants[] = {
      {1, std::nullopt, DropPolicy::position, false, Noise::learned, NoiseScale::softplus},
      {2, std::nullopt, DropPolicy::position, true, Noise::learned, NoiseScale::linear},
      {2, 0.75, DropPolicy::probs, false, Noise::fixed, NoiseScale::softplus},
      {3, 1.0, DropPolicy::position, true, Noise::none, NoiseScale::softplus},
      {2, 1.0, DropPolicy::position, false, Noise::learned, NoiseScale::softplus},
  };
  const std::pair<moe::ExpertKind, moe::Activation> kinds[] = {
      {moe::ExpertKind::linear_relu, moe::Activation::relu},
      {moe::ExpertKind::mlp, moe::Activation::relu},
      {moe::ExpertKind::mlp, moe::Activation::gelu},
      {moe::ExpertKind::mlp, moe::Activation::silu},
      {moe::ExpertKind::swiglu, moe::Activation::relu}};
  uint64_t seed = 1;
  for (auto [kind, act] : kinds)
    for (const auto& v : variants) {
      moe_test::Case cs{kind, act, v.k, v.cf, v.pol, v.residual, v.noise, v.scale};
      SCOPED_TRACE(cs.name());
      gradient_check(cs, seed++);
      if (::testing::Test::HasFatalFailure()) return;
    }
}

namespace {

struct FastRun {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;
};

FastRun run_fast(MoELayer& L, const std::vector<float>& x, const std::vector<float>& dy,
                 int64_t T, const moe::ForwardOptions& opt) {
  FastRun r;
  r.y.resize(static_cast<size_t>(T * L.config().out_dim()));
  r.dx.resize(x.size());
  L.zero_grad();
  L.forward(r.y.data(), x.data(), T, opt);
  L.backward(r.dx.data(), dy.data());
  for (const auto& n : L.parameter_names()) r.grads.push_back(L.grad(n).data);
  return r;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double a : v) m = std::max(m, std::abs(a));
  return m;
}

}  // namespace

// The fast float backward against the double reference backward on the whole matrix.
TEST(LayerFastVsRef, BackwardEveryConfiguration) {
  int n = 0;
  for (const auto& cs : moe_test::all_cases())
    for (int64_t T : {1, 29}) {
      SCOPED_TRACE(cs.name() + " T=" + std::to_string(T));
      const int64_t E = cs.k == 1 ? 4 : 5;
      MoEConfig cfg = moe_test::config_of(cs, 7, E, 9, 6, 21 + n);
      MoELayer L(cfg);
      Rng rng(3000 + n++);
      moe_test::randomize(L, rng);
      const auto x = rng.vec(T * 7, 1.0);
      const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
      moe::ForwardOptions opt;
      opt.step = 1;
      const FastRun f = run_fast(L, x, dy, T, opt);

      moe_test::RefRun r;
      ASSERT_NO_FATAL_FAILURE(moe_test::run_reference(r, L, x, dy, T));
      const double guard = T == 1 ? 0.0 : 0.2;
      moe_test::expect_close(f.dx, r.dx, 3e-5 * (1 + max_abs(r.dx)), 3e-4, "dx", guard);
      const auto names = L.parameter_names();
      for (size_t i = 0; i < names.size(); ++i) {
        const auto& want = r.grads.get(names[i]);
        // Experts that got no rows have zero gradients by design: the guard is loose here.
        moe_test::expect_close(f.grads[i], want, 3e-5 * (1 + max_abs(want)), 3e-4,
                               "d" + names[i], 0.0);
      }
      if (::testing::Test::HasFailure()) return;
    }
}

// Gradients accumulate until zero_grad; backward can be repeated on the saved state.
TEST(LayerBackward, AccumulatesUntilZeroGrad) {
  moe_test::Case cs{moe::ExpertKind::mlp, moe::Activation::gelu, 2, 1.0,
                    moe::DropPolicy::position, false, moe::Noise::learned,
                    moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 5, 4, 6, 3, 9);
  MoELayer L(cfg);
  Rng rng(9);
  moe_test::randomize(L, rng);
  const auto x = rng.vec(10 * 5, 1.0);
  const auto dy = rng.vec(10 * 3, 1.0);
  std::vector<float> y(30), dx1(50), dx2(50);
  L.forward(y.data(), x.data(), 10);
  L.backward(dx1.data(), dy.data());
  std::vector<std::vector<float>> once;
  for (const auto& n : L.parameter_names()) once.push_back(L.grad(n).data);
  L.backward(dx2.data(), dy.data());
  EXPECT_EQ(dx1, dx2);  // assigned, not accumulated
  const auto names = L.parameter_names();
  for (size_t i = 0; i < names.size(); ++i)
    for (size_t j = 0; j < once[i].size(); ++j)
      EXPECT_FLOAT_EQ(L.grad(names[i]).data[j], 2 * once[i][j]) << names[i];
  L.zero_grad();
  for (const auto& n : names)
    for (float v : L.grad(n).data) EXPECT_EQ(v, 0.0f);
}

// A dropped assignment gets no gradient: with k = 1, no noise and no auxiliary losses, the
// dropped tokens' dx is exactly dy through the residual path (or zero without it), and the
// expert that got nothing has zero gradients.
TEST(LayerBackward, DroppedAssignmentsGetNoGradient) {
  for (bool residual : {false, true}) {
    MoEConfig cfg;
    cfg.d_model = 2;
    cfg.n_experts = 2;
    cfg.k = 1;
    cfg.expert = moe::ExpertKind::mlp;
    cfg.d_ff = 3;
    cfg.noise = moe::Noise::none;
    cfg.capacity_factor = 1.0;
    cfg.aux_alpha = 0.0f;
    cfg.residual = residual;
    MoELayer L(cfg);
    Rng rng(4);
    moe_test::randomize(L, rng);
    L.param("W_g").data = {1, 0, 0, 1};
    std::vector<float> x;
    for (int t = 0; t < 8; ++t) x.insert(x.end(), {2.0f + 0.1f * t, 0.5f});  // all → expert 0
    const auto dy = rng.vec(16, 1.0);
    std::vector<float> y(16), dx(16);
    L.forward(y.data(), x.data(), 8);
    ASSERT_EQ(L.stats().dropped_tokens, 4);
    L.backward(dx.data(), dy.data());
    for (int t = 0; t < 8; ++t)
      for (int c = 0; c < 2; ++c) {
        if (t >= 4) {
          EXPECT_EQ(dx[t * 2 + c], residual ? dy[t * 2 + c] : 0.0f) << "token " << t;
        } else {
          EXPECT_NE(dx[t * 2 + c], residual ? dy[t * 2 + c] : 0.0f) << "token " << t;
        }
      }
    // Expert 1 received nothing: its slices of W1, b1, W2, b2 have zero gradient.
    for (const char* n : {"W1", "b1", "W2", "b2"}) {
      const auto& g = L.grad(n).data;
      const size_t half = g.size() / 2;
      EXPECT_TRUE(std::all_of(g.begin() + half, g.end(), [](float v) { return v == 0.0f; })) << n;
      EXPECT_TRUE(std::any_of(g.begin(), g.begin() + half, [](float v) { return v != 0.0f; })) << n;
    }
  }
}

// Forward and backward give the same bits with 1 and 2 OpenMP threads, on shapes with
// several GEMM tiles per expert.
// fp32 and bf16 (precision bf16: the expert products on bf16 operands; T = 1700 gives the
// experts more rows than one 512-row bf16 tile).
TEST(LayerDeterminism, OneAndTwoThreadsBitIdentical) {
  const int saved = omp_get_max_threads();
  for (auto precision : {moe::Precision::fp32, moe::Precision::bf16})
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu,
                    moe::ExpertKind::clamped_swiglu}) {
    SCOPED_TRACE(std::string(moe::to_string(kind)) + " " + moe::to_string(precision));
    moe_test::Case cs{kind, moe::Activation::silu, 2, 1.25, moe::DropPolicy::probs,
                      kind != moe::ExpertKind::linear_relu, moe::Noise::learned,
                      moe::NoiseScale::softplus};
    MoEConfig cfg = moe_test::config_of(cs, 70, 6, 130, 45, 5);
    cfg.precision = precision;
    cfg.swiglu_limit = 1.0f;  // clamped_swiglu: the clamps bite
    MoELayer L(cfg);
    Rng rng(8);
    moe_test::randomize(L, rng);
    const int64_t T = precision == moe::Precision::bf16 ? 1700 : 300;
    const auto x = rng.vec(T * 70, 1.0);
    const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
    moe::ForwardOptions opt;
    opt.step = 4;
    omp_set_num_threads(1);
    const FastRun a = run_fast(L, x, dy, T, opt);
    omp_set_num_threads(2);
    const FastRun b = run_fast(L, x, dy, T, opt);
    omp_set_num_threads(saved);
    EXPECT_EQ(a.y, b.y);
    EXPECT_EQ(a.dx, b.dx);
    const auto names = L.parameter_names();
    for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(a.grads[i], b.grads[i]) << names[i];
    // Zero-trust: the runs did something.
    EXPECT_GT(std::count_if(a.y.begin(), a.y.end(), [](float v) { return v != 0.0f; }),
              static_cast<long>(a.y.size() / 2));
  }
}
