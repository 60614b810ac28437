// The router family's balancing losses (none, seq, global, shazeer), drop policies random and
// priority, GShard's random second expert: values against direct computations, central
// differences in double on the reference twin, and the fast layer against the reference.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "dispatch/capacity_plan.hpp"
#include "dispatch/dispatch_random.hpp"
#include "losses/balancing.hpp"
#include "test_layer_util.hpp"

using moe::AuxLossKind;
using moe::MoEConfig;
using moe::MoELayer;
using moe_test::Rng;
using Ref = moe::detail::RefParams<double>;
using Saved = moe::detail::RefSaved<double>;

namespace {

MoEConfig small_config(AuxLossKind kind, moe::Noise noise, moe::NoiseScale scale, int64_t k,
                       uint64_t seed) {
  moe_test::Case cs{moe::ExpertKind::mlp, moe::Activation::gelu, k, std::nullopt,
                    moe::DropPolicy::position, false, noise, scale};
  MoEConfig cfg = moe_test::config_of(cs, 4, 5, 5, 3, seed);
  cfg.aux_loss_kind = kind;
  cfg.aux_alpha = 0.3f;
  cfg.z_alpha = 0.02f;
  return cfg;
}

// Smallest gap between any two noisy logits of a row (every order statistic the losses read
// and KeepTopK itself stay put under a step smaller than this), and of GELU inputs from
// nothing (GELU is smooth): only the routing gaps matter here.
double routing_margin(const Saved& sv, int64_t E) {
  double m = 1e9;
  for (int64_t t = 0; t < sv.T; ++t) {
    std::vector<double> row(sv.H.begin() + t * E, sv.H.begin() + (t + 1) * E);
    std::sort(row.begin(), row.end());
    for (int64_t e = 1; e < E; ++e) m = std::min(m, row[e] - row[e - 1]);
  }
  return m;
}

double objective(const std::vector<double>& x, const Ref& p, const MoEConfig& cfg, int64_t T,
                 const std::vector<double>& eps, const std::vector<double>& r, Saved& sv) {
  std::vector<double> y;
  moe::detail::layer_forward_ref<double>(y, sv, x.data(), p, cfg, T, true,
                                         eps.empty() ? nullptr : eps.data());
  double L = sv.aux_loss + sv.z_loss;
  for (size_t i = 0; i < y.size(); ++i) L += r[i] * y[i];
  return L;
}

// Central differences of L = Σ r·y + aux + z on the reference twin in double, against its
// backward, for dx and every parameter. r_scale 0 checks the losses' gradients alone.
void gradient_check(const MoEConfig& cfg, int64_t T, uint64_t seed, double r_scale) {
  const int64_t d = cfg.d_model, E = cfg.n_experts;
  MoELayer L(cfg);
  Ref p;
  std::vector<double> x, eps, r;
  Saved sv;
  double margin = 0;
  for (int attempt = 0; attempt < 300 && margin < 2e-3; ++attempt) {
    Rng rng(seed * 1000 + attempt);
    moe_test::randomize(L, rng);
    p = Ref::from(L);
    x = moe_test::convert<double>(rng.vec(T * d, 1.0));
    eps = cfg.noise == moe::Noise::none ? std::vector<double>{}
                                        : moe_test::convert<double>(rng.vec(T * E, 1.5));
    r = moe_test::convert<double>(rng.vec(T * cfg.out_dim(), r_scale));
    objective(x, p, cfg, T, eps, r, sv);
    margin = routing_margin(sv, E);
  }
  ASSERT_GE(margin, 2e-3) << "no sample with every decision away from its kink";
  ASSERT_GT(std::abs(sv.aux_loss), 1e-4) << "the balancing loss must be visible";
  const auto indices0 = sv.indices;
  Ref g = Ref::zeros_like(L);
  std::vector<double> dx;
  moe::detail::layer_backward_ref<double>(dx, g, r.data(), sv, p, cfg);
  auto check = [&](std::vector<double>& v, const std::vector<double>& an,
                   const std::string& what) -> int64_t {
    return moe_test::central_differences<Saved>(
        v, an, what, [&](Saved& s) { return objective(x, p, cfg, T, eps, r, s); },
        [&](const Saved& s) { return s.indices == indices0; }, 1e-6, 1e-5, 1e-7);
  };
  const int64_t nx = check(x, dx, "dx");
  EXPECT_GE(nx, static_cast<int64_t>(x.size()) / 2) << "dx: too few non-zero";
  for (const auto& n : L.parameter_names()) {
    if (r_scale == 0.0 && n != "W_g" && n != "W_noise" && n != "b_g") continue;
    const int64_t nz = check(p.get(n), g.get(n), "d" + n);
    if (n == "W_g" || n == "W_noise") {
      EXPECT_GE(nz, 1) << "d" << n << ": all zero";
    }
  }
}

// The fast float layer against the double reference: loss value, dx and every gradient.
void fast_vs_ref(const MoEConfig& cfg, int64_t T, uint64_t seed) {
  MoELayer L(cfg);
  Rng rng(seed);
  moe_test::randomize(L, rng);
  const auto x = rng.vec(T * cfg.d_model, 1.0);
  const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
  std::vector<float> y(static_cast<size_t>(T * cfg.out_dim())), dx(x.size());
  moe::ForwardOptions opt;
  opt.step = 3;
  L.zero_grad();
  L.forward(y.data(), x.data(), T, opt);
  L.backward(dx.data(), dy.data());
  const Ref p = Ref::from(L);
  Saved sv;
  std::vector<double> yr, dxr;
  const auto xd = moe_test::convert<double>(x);
  const auto eps = moe_test::convert<double>(L.routing().eps);
  moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), p, cfg, T, true,
                                         eps.empty() ? nullptr : eps.data(), 3);
  ASSERT_EQ(L.routing().indices, sv.indices);
  EXPECT_NEAR(L.aux_loss(), sv.aux_loss, 1e-5 * (1 + std::abs(sv.aux_loss)));
  Ref g = Ref::zeros_like(L);
  const auto dyd = moe_test::convert<double>(dy);
  moe::detail::layer_backward_ref<double>(dxr, g, dyd.data(), sv, p, cfg);
  moe_test::expect_close(dx, dxr, 3e-5, 3e-4, "dx", 0.2);
  for (const auto& n : L.parameter_names())
    moe_test::expect_close(L.grad(n).data, g.get(n), 3e-5, 3e-4, "d" + n, 0.0);
}

}  // namespace

// aux_loss none: no loss value and no gradient whatever aux_alpha is.
TEST(RouterLosses, NoneHasNoValueAndNoGradient) {
  MoEConfig a = small_config(AuxLossKind::none, moe::Noise::learned, moe::NoiseScale::softplus,
                             2, 3);
  a.aux_alpha = 0.5f;
  MoEConfig b = a;
  b.aux_loss_kind = AuxLossKind::switch_lb;
  b.aux_alpha = 0.0f;
  MoELayer La(a), Lb(b);
  Rng r1(5), r2(5);
  moe_test::randomize(La, r1);
  moe_test::randomize(Lb, r2);
  const int64_t T = 12;
  Rng rng(6);
  const auto x = rng.vec(T * 4, 1.0);
  const auto dy = rng.vec(T * 3, 1.0);
  std::vector<float> ya(T * 3), yb(T * 3), dxa(T * 4), dxb(T * 4);
  La.forward(ya.data(), x.data(), T);
  Lb.forward(yb.data(), x.data(), T);
  EXPECT_EQ(La.aux_loss(), 0.0);
  EXPECT_EQ(La.stats().aux_loss, 0.0);
  La.backward(dxa.data(), dy.data());
  Lb.backward(dxb.data(), dy.data());
  EXPECT_EQ(ya, yb);
  EXPECT_EQ(dxa, dxb);
  for (const auto& n : La.parameter_names()) EXPECT_EQ(La.grad(n).data, Lb.grad(n).data) << n;
}

// seq: the switch loss of each sequence of seq_len tokens, averaged; seq_len 0 or T is switch.
TEST(RouterLosses, SeqIsMeanOfPerSequenceSwitch) {
  for (bool norm : {false, true}) {
    MoEConfig cfg = small_config(AuxLossKind::seq, moe::Noise::learned,
                                 moe::NoiseScale::softplus, 2, 4);
    cfg.normalize_by_k = norm;
    const int64_t T = 12;
    Rng rng(7);
    const auto x = rng.vec(T * 4, 1.0);
    std::vector<float> y(T * 3);
    for (int64_t L : {0, 3, 4, 12}) {
      cfg.seq_len = L;
      MoELayer layer(cfg);
      Rng r(8);
      moe_test::randomize(layer, r);
      layer.forward(y.data(), x.data(), T);
      const auto& R = layer.routing();
      const int64_t n = L == 0 ? T : L;
      double want = 0;
      for (int64_t q = 0; q < T / n; ++q)
        want += moe::load_balancing_loss(nullptr, R.indices.data() + q * n * 2,
                                         R.probs.data() + q * n * 5, n, 2, 5, cfg.aux_alpha, norm);
      want /= static_cast<double>(T / n);
      EXPECT_NEAR(layer.aux_loss(), want, 1e-7) << "seq_len " << L;
      if (L == 4) {  // differs from the whole-batch loss on this data
        const double whole = moe::load_balancing_loss(nullptr, R.indices.data(), R.probs.data(),
                                                      T, 2, 5, cfg.aux_alpha, norm);
        EXPECT_GT(std::abs(layer.aux_loss() - whole), 1e-5);
      }
    }
    cfg.seq_len = 5;
    MoELayer layer(cfg);
    try {
      layer.forward(y.data(), x.data(), T);
      ADD_FAILURE() << "T = 12 with seq_len = 5 must be refused";
    } catch (const moe::Error& e) {
      EXPECT_NE(std::string(e.what()).find("seq_len"), std::string::npos) << e.what();
    }
  }
}

TEST(RouterLosses, SeqGradCheckDouble) {
  MoEConfig cfg = small_config(AuxLossKind::seq, moe::Noise::learned, moe::NoiseScale::softplus,
                               2, 11);
  cfg.seq_len = 3;
  gradient_check(cfg, 9, 11, 1.0);
  fast_vs_ref(cfg, 12, 12);
}

// global: f from the loads of every training forward since the last reset, P from the batch.
TEST(RouterLosses, GlobalAccumulatesUntilReset) {
  MoEConfig cfg = small_config(AuxLossKind::global, moe::Noise::learned,
                               moe::NoiseScale::softplus, 2, 5);
  MoEConfig sw = cfg;
  sw.aux_loss_kind = AuxLossKind::switch_lb;
  MoELayer G(cfg), S(sw);
  Rng r1(9), r2(9);
  moe_test::randomize(G, r1);
  moe_test::randomize(S, r2);
  Rng rng(10);
  const auto x1 = rng.vec(10 * 4, 1.0), x2 = rng.vec(6 * 4, 1.0);
  std::vector<float> y(10 * 3), dg(10 * 4), ds(10 * 4), dy(10 * 3, 0.0f);
  moe::ForwardOptions o1, o2;
  o2.step = 1;
  // One forward after construction: exactly switch, value and gradient.
  G.forward(y.data(), x1.data(), 10, o1);
  S.forward(y.data(), x1.data(), 10, o1);
  EXPECT_EQ(G.aux_loss(), S.aux_loss());
  G.backward(dg.data(), dy.data());
  S.backward(ds.data(), dy.data());
  EXPECT_EQ(dg, ds);
  EXPECT_EQ(G.grad("W_g").data, S.grad("W_g").data);
  const std::vector<int64_t> load1 = G.stats().load_before;
  // A second forward: f over both batches.
  G.forward(y.data(), x2.data(), 6, o2);
  const auto& R = G.routing();
  double want = 0;
  for (int64_t e = 0; e < 5; ++e) {
    double P = 0;
    for (int64_t t = 0; t < 6; ++t) P += R.probs[t * 5 + e];
    want += (load1[e] + G.stats().load_before[e]) / 16.0 * P / 6.0;
  }
  want *= cfg.aux_alpha * 5;
  EXPECT_NEAR(G.aux_loss(), want, 1e-7);
  // An evaluation forward neither uses nor changes the loads; a reset starts over.
  G.forward(y.data(), x2.data(), 6, moe::ForwardOptions{false});
  G.reset_global_load();
  G.forward(y.data(), x2.data(), 6, o2);
  S.forward(y.data(), x2.data(), 6, o2);
  EXPECT_EQ(G.aux_loss(), S.aux_loss());
}

// Shazeer et al. 2017 importance + load losses: central differences through Φ, the noise
// scale, the thresholds and the gates, for every noise kind.
TEST(RouterLosses, ShazeerGradCheckDouble) {
  struct V {
    moe::Noise noise;
    moe::NoiseScale scale;
    int64_t k;
  };
  const V vs[] = {{moe::Noise::learned, moe::NoiseScale::softplus, 2},
                  {moe::Noise::learned, moe::NoiseScale::linear, 1},
                  {moe::Noise::fixed, moe::NoiseScale::softplus, 3},
                  {moe::Noise::none, moe::NoiseScale::softplus, 2}};
  uint64_t seed = 20;
  for (const auto& v : vs) {
    SCOPED_TRACE(std::string(moe::to_string(v.noise)) + "_" + moe::to_string(v.scale) + "_k" +
                 std::to_string(v.k));
    MoEConfig cfg = small_config(AuxLossKind::shazeer, v.noise, v.scale, v.k, seed);
    gradient_check(cfg, 8, seed, 0.0);  // the losses alone
    gradient_check(cfg, 8, seed + 1, 1.0);
    fast_vs_ref(cfg, 13, seed + 2);
    seed += 3;
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Shazeer's load term by hand on one token: P(x, i) = Φ((h_i − kth_excluding(H, k, i)) / s_i).
TEST(RouterLosses, ShazeerLoadByHand) {
  using S = double;
  const int64_t T = 2, E = 3, k = 1;
  const std::vector<S> h = {0.5, -0.2, 0.1, 0.0, 0.3, -0.4};
  const std::vector<S> eps = {0.3, 0.2, -0.5, 1.0, -0.1, 0.2};
  const double sigma = 0.8;
  std::vector<S> H(6);
  for (int i = 0; i < 6; ++i) H[i] = h[i] + sigma * eps[i];
  // Row 0: H = 0.74, -0.04, -0.3 → top 0; row 1: H = 0.8, 0.22, -0.24 → top 0.
  const std::vector<int32_t> idx = {0, 0};
  const std::vector<S> w = {1.0, 1.0};
  moe::detail::BalanceInputs<S> in;
  in.T = T;
  in.k = k;
  in.E = E;
  in.indices = idx.data();
  in.weights = w.data();
  in.h = h.data();
  in.H = H.data();
  in.eps = eps.data();
  in.noisy = true;
  moe::detail::BalanceSpec sp;
  sp.kind = AuxLossKind::shazeer;
  sp.alpha = 1.0;
  sp.noise = moe::Noise::fixed;
  sp.noise_stddev = sigma;
  auto Phi = [](double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); };
  std::vector<double> load(3, 0.0);
  for (int t = 0; t < T; ++t) {
    const S* Hr = &H[t * 3];
    load[0] += Phi((h[t * 3 + 0] - Hr[1]) / sigma);  // in the top 1: threshold the 2nd
    load[1] += Phi((h[t * 3 + 1] - Hr[0]) / sigma);  // not: the 1st among the others
    load[2] += Phi((h[t * 3 + 2] - Hr[0]) / sigma);
  }
  auto cv2 = [](const std::vector<double>& v) {
    const double m = (v[0] + v[1] + v[2]) / 3;
    double var = 0;
    for (double a : v) var += (a - m) * (a - m);
    return var / 3 / (m * m + 1e-10);
  };
  const double want = cv2({2.0, 0.0, 0.0}) + cv2(load);
  EXPECT_NEAR(moe::detail::balancing_loss<S>({}, in, sp), want, 1e-12);
  in.noisy = false;  // no noise: the importance term only
  EXPECT_NEAR(moe::detail::balancing_loss<S>({}, in, sp), cv2({2.0, 0.0, 0.0}), 1e-12);
}

// drop_policy random: an over-full expert keeps the C assignments of largest Philox priority;
// the draw depends on the global token, not on the batch split.
TEST(RouterDispatch, RandomDropKeepsHighestPriority) {
  const int64_t T = 40, k = 2, E = 4, C = 7;
  Rng rng(31);
  std::vector<int32_t> idx(T * k);
  std::vector<float> w(T * k);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t a = static_cast<int32_t>(rng.below(E));
    idx[t * k] = a;
    idx[t * k + 1] = static_cast<int32_t>((a + 1 + rng.below(E - 1)) % E);
    w[t * k] = 0.7f;
    w[t * k + 1] = 0.3f;
  }
  moe::detail::PlanOptions po;
  po.C = C;
  po.policy = moe::DropPolicy::random;
  po.seed = 5;
  po.step = 2;
  po.token_offset = 100;
  moe::detail::CapacityPlan p;
  moe::detail::build_capacity_plan<float>(p, idx.data(), w.data(), T, k, E, po);
  int64_t dropped = 0;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<std::pair<uint32_t, int64_t>> pr;
    for (int64_t a = 0; a < T * k; ++a)
      if (idx[a] == e)
        pr.push_back({moe::detail::dispatch_bits(5, 2, 100 + a / k,
                                                 moe::detail::DispatchStream::drop_priority, a % k),
                      a});
    std::sort(pr.begin(), pr.end(), [](auto x, auto y) {
      return x.first != y.first ? x.first > y.first : x.second < y.second;
    });
    EXPECT_EQ(p.load_after[e], std::min<int64_t>(C, pr.size()));
    for (size_t i = 0; i < pr.size(); ++i) {
      EXPECT_EQ(p.src_to_dest[pr[i].second] >= 0, static_cast<int64_t>(i) < C) << e << " " << i;
      dropped += static_cast<int64_t>(i) >= C;
    }
  }
  EXPECT_GT(dropped, 0);
  // Not simply the position policy, and another step draws other priorities.
  moe::detail::CapacityPlan q, r;
  moe::detail::build_capacity_plan<float>(q, idx.data(), w.data(), T, k, E, C,
                                          moe::DropPolicy::position);
  EXPECT_NE(p.src_to_dest, q.src_to_dest);
  po.step = 3;
  moe::detail::build_capacity_plan<float>(r, idx.data(), w.data(), T, k, E, po);
  EXPECT_NE(p.src_to_dest, r.src_to_dest);
}

// drop_policy priority: V-MoE batch-prioritised routing on a hand example.
TEST(RouterDispatch, PriorityFillsByTop1Weight) {
  // k = 2, E = 2, C = 2. Tokens' top-1 weights: t0 0.6, t1 0.9, t2 0.7.
  const std::vector<int32_t> idx = {0, 1, 0, 1, 1, 0};
  const std::vector<float> w = {0.6f, 0.4f, 0.9f, 0.1f, 0.7f, 0.3f};
  moe::detail::PlanOptions po;
  po.C = 2;
  po.policy = moe::DropPolicy::priority;
  moe::detail::CapacityPlan p;
  moe::detail::build_capacity_plan<float>(p, idx.data(), w.data(), 3, 2, 2, po);
  // Order t1, t2, t0. Rank 0: t1→0, t2→1, t0→0 (expert 0 now full). Rank 1: t1→1 (full),
  // t2→0 dropped, t0→1 dropped.
  std::vector<bool> kept;
  for (int a = 0; a < 6; ++a) kept.push_back(p.src_to_dest[a] >= 0);
  EXPECT_EQ(kept, (std::vector<bool>{true, false, true, true, true, false}));
  EXPECT_EQ(p.load_after, (std::vector<int64_t>{2, 2}));
  // Position would instead keep t0's second choice over t1's.
  moe::detail::CapacityPlan q;
  moe::detail::build_capacity_plan<float>(q, idx.data(), w.data(), 3, 2, 2, 2,
                                          moe::DropPolicy::position);
  EXPECT_NE(p.src_to_dest, q.src_to_dest);
}

// second_expert_policy random (GShard): the second choice goes out iff u_t < 2·w2/(w1 + w2).
TEST(RouterDispatch, RandomSecondExpertFollowsGShardRule) {
  const int64_t T = 2000, k = 2, E = 4;
  Rng rng(40);
  std::vector<int32_t> idx(T * k);
  std::vector<float> w(T * k);
  double expect = 0;
  for (int64_t t = 0; t < T; ++t) {
    idx[t * k] = 0;
    idx[t * k + 1] = 1 + static_cast<int32_t>(rng.below(3));
    const float w2 = static_cast<float>(0.5 * rng.uniform());
    w[t * k] = 1.0f - w2;
    w[t * k + 1] = w2;
    expect += std::min(1.0, 2.0 * w2);
  }
  moe::detail::PlanOptions po;
  po.second = moe::SecondExpertPolicy::random;
  po.seed = 9;
  po.step = 4;
  po.token_offset = 17;
  moe::detail::CapacityPlan p;
  moe::detail::build_capacity_plan<float>(p, idx.data(), w.data(), T, k, E, po);
  int64_t sent = 0;
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_GE(p.src_to_dest[t * k], 0);
    const double u = moe::detail::dispatch_uniform(
        9, 4, 17 + t, moe::detail::DispatchStream::second_expert, 0);
    const double w1 = w[t * k], w2 = w[t * k + 1];
    EXPECT_EQ(p.src_to_dest[t * k + 1] >= 0, u < 2 * w2 / (w1 + w2)) << t;
    sent += p.src_to_dest[t * k + 1] >= 0;
  }
  EXPECT_EQ(p.second_skipped, T - sent);
  EXPECT_NEAR(static_cast<double>(sent), expect, 4 * std::sqrt(expect));
  // Skipped second choices take no slot: with capacity, they leave room to others.
  po.C = T;  // enough for all: nothing but the skipped ones is dropped
  moe::detail::CapacityPlan q;
  moe::detail::build_capacity_plan<float>(q, idx.data(), w.data(), T, k, E, po);
  EXPECT_EQ(q.src_to_dest.size(), p.src_to_dest.size());
  for (int64_t a = 0; a < T * k; ++a) EXPECT_EQ(q.src_to_dest[a] >= 0, p.src_to_dest[a] >= 0);
}

// The layer with the new policies: fast against reference (the plan is shared; the random
// draws are keyed by the same step), the gradient with its drops, and a skipped second
// expert's weight gets no gradient.
TEST(RouterDispatch, LayerFastVsRefNewPolicies) {
  uint64_t seed = 50;
  for (auto pol : {moe::DropPolicy::random, moe::DropPolicy::priority})
    for (auto second : {moe::SecondExpertPolicy::all, moe::SecondExpertPolicy::random}) {
      MoEConfig cfg = small_config(AuxLossKind::switch_lb, moe::Noise::learned,
                                   moe::NoiseScale::softplus, 2, seed);
      cfg.capacity_factor = 0.75;
      cfg.drop_policy = pol;
      cfg.second_expert_policy = second;
      SCOPED_TRACE(std::string(moe::to_string(pol)) + "_" + moe::to_string(second));
      fast_vs_ref(cfg, 16, seed++);
      if (::testing::Test::HasFatalFailure()) return;
    }
}

// Shared experts (DeepSeek-MoE / Qwen-MoE): always-active experts of the routed kind, gated
// by sigmoid(x·w_shared_gate) when asked. Central differences in double on the reference
// twin for every kind, and the fast layer against it.
TEST(SharedExperts, GradCheckAndFastVsRef) {
  const std::pair<moe::ExpertKind, moe::Activation> kinds[] = {
      {moe::ExpertKind::linear_relu, moe::Activation::relu},
      {moe::ExpertKind::mlp, moe::Activation::gelu},
      {moe::ExpertKind::swiglu, moe::Activation::relu}};
  uint64_t seed = 70;
  for (auto [kind, act] : kinds)
    for (int64_t n : {1, 2})
      for (bool gate : {false, true}) {
        MoEConfig cfg = small_config(AuxLossKind::switch_lb, moe::Noise::learned,
                                     moe::NoiseScale::softplus, 2, seed);
        cfg.expert = kind;
        cfg.activation = act;
        cfg.n_shared_experts = n;
        cfg.shared_gate = gate;
        SCOPED_TRACE(std::string(moe::to_string(kind)) + " n=" + std::to_string(n) +
                     (gate ? " gated" : ""));
        MoELayer L(cfg);
        std::vector<std::string> want = {"Ws1"};
        if (kind != moe::ExpertKind::swiglu) want.push_back("bs1");
        if (kind != moe::ExpertKind::linear_relu) want.push_back("Ws2");
        if (kind == moe::ExpertKind::mlp) want.push_back("bs2");
        if (kind == moe::ExpertKind::swiglu) want.push_back("Ws3");
        if (gate) want.push_back("w_shared_gate");
        const auto names = L.parameter_names();
        for (const auto& w : want)
          EXPECT_NE(std::find(names.begin(), names.end(), w), names.end()) << w;
        EXPECT_EQ(L.param("Ws1").shape[0], n);
        if (kind != moe::ExpertKind::linear_relu) {  // ReLU kinks: the smooth kinds only
          gradient_check(cfg, 6, seed, 1.0);
          if (::testing::Test::HasFatalFailure()) return;
        }
        fast_vs_ref(cfg, 11, seed + 1);
        if (::testing::Test::HasFatalFailure()) return;
        seed += 2;
      }
}

// The layer's output minus the same layer without shared experts is the shared output.
TEST(SharedExperts, OutputIsRoutedPlusShared) {
  MoEConfig cfg = small_config(AuxLossKind::switch_lb, moe::Noise::none,
                               moe::NoiseScale::softplus, 2, 90);
  cfg.n_shared_experts = 2;
  cfg.shared_gate = true;
  MoELayer L(cfg);
  Rng rng(91);
  moe_test::randomize(L, rng);
  MoEConfig plain = cfg;
  plain.n_shared_experts = 0;
  plain.shared_gate = false;
  MoELayer P(plain);
  for (const auto& n : P.parameter_names()) P.param(n).data = L.param(n).data;
  const int64_t T = 7;
  const auto x = rng.vec(T * 4, 1.0);
  std::vector<float> y(T * 3), yp(T * 3);
  L.forward(y.data(), x.data(), T);
  P.forward(yp.data(), x.data(), T);
  moe::detail::SharedRefParams<double> sp;
  const auto& g = L.param("w_shared_gate").data;
  sp.Ws1 = moe_test::convert<double>(L.param("Ws1").data);
  sp.bs1 = moe_test::convert<double>(L.param("bs1").data);
  sp.Ws2 = moe_test::convert<double>(L.param("Ws2").data);
  sp.bs2 = moe_test::convert<double>(L.param("bs2").data);
  sp.w_shared_gate = moe_test::convert<double>(g);
  std::vector<double> ys(T * 3, 0.0);
  const auto xd = moe_test::convert<double>(x);
  moe::detail::shared_forward_ref<double>(ys.data(), xd.data(), T, sp, cfg);
  std::vector<double> diff(T * 3);
  for (int64_t i = 0; i < T * 3; ++i) diff[i] = static_cast<double>(y[i]) - yp[i];
  moe_test::expect_close(diff, ys, 1e-5, 1e-4, "y - routed", 0.9);
}

// The second-expert draw belongs to the global token: a batch routed in two parts (with
// token_offset) makes the same decisions as routed whole.
TEST(RouterDispatch, SecondExpertDrawIndependentOfBatchSplit) {
  const int64_t T = 50, k = 2, E = 3;
  Rng rng(77);
  std::vector<int32_t> idx(T * k);
  std::vector<float> w(T * k);
  for (int64_t t = 0; t < T; ++t) {
    idx[t * k] = static_cast<int32_t>(t % E);
    idx[t * k + 1] = static_cast<int32_t>((t + 1) % E);
    w[t * k + 1] = static_cast<float>(0.5 * rng.uniform());
    w[t * k] = 1.0f - w[t * k + 1];
  }
  moe::detail::PlanOptions po;
  po.second = moe::SecondExpertPolicy::random;
  po.seed = 3;
  po.step = 8;
  moe::detail::CapacityPlan whole, a, b;
  moe::detail::build_capacity_plan<float>(whole, idx.data(), w.data(), T, k, E, po);
  const int64_t T1 = 23;
  moe::detail::build_capacity_plan<float>(a, idx.data(), w.data(), T1, k, E, po);
  po.token_offset = T1;
  moe::detail::build_capacity_plan<float>(b, idx.data() + T1 * k, w.data() + T1 * k, T - T1, k,
                                          E, po);
  for (int64_t t = 0; t < T; ++t) {
    const bool part = t < T1 ? a.src_to_dest[t * k + 1] >= 0 : b.src_to_dest[(t - T1) * k + 1] >= 0;
    EXPECT_EQ(whole.src_to_dest[t * k + 1] >= 0, part) << t;
  }
  EXPECT_GT(whole.second_skipped, 0);
  EXPECT_LT(whole.second_skipped, T);
}

// Every option of this part at once gives the same bits with 1 and 2 OpenMP threads.
TEST(RouterDispatch, OneAndTwoThreadsBitIdentical) {
  const int saved = omp_get_max_threads();
  MoEConfig cfg = small_config(AuxLossKind::shazeer, moe::Noise::learned,
                               moe::NoiseScale::softplus, 2, 99);
  cfg.d_model = 40;
  cfg.d_ff = 70;
  cfg.d_out = 30;
  cfg.n_experts = 6;
  cfg.capacity_factor = 0.9;
  cfg.drop_policy = moe::DropPolicy::random;
  cfg.second_expert_policy = moe::SecondExpertPolicy::random;
  cfg.n_shared_experts = 2;
  cfg.shared_gate = true;
  MoELayer L(cfg);
  Rng rng(100);
  moe_test::randomize(L, rng);
  const int64_t T = 400;
  const auto x = rng.vec(T * 40, 1.0);
  const auto dy = rng.vec(T * 30, 1.0);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> y(T * 30), dx(T * 40);
    L.zero_grad();
    moe::ForwardOptions opt;
    opt.step = 6;
    L.forward(y.data(), x.data(), T, opt);
    L.backward(dx.data(), dy.data());
    std::vector<std::vector<float>> out = {y, dx, {static_cast<float>(L.aux_loss())}};
    for (const auto& n : L.parameter_names()) out.push_back(L.grad(n).data);
    return out;
  };
  const auto a = run(1), b = run(2);
  omp_set_num_threads(saved);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << i;
  EXPECT_GT(L.stats().dropped_assignments, 0);
}

// Shazeer's load term with Switch jitter: the noise scale is computed from the router's
// jittered input x⊙J, so dW_noise = (x⊙J)ᵀ·dpre and dx gets (dpre·W_noiseᵀ)⊙J. The double
// reference has no jitter, so this is central differences on the float layer itself (aux
// loss alone: dy = 0), with a float-sized step and tolerance.
TEST(RouterLosses, ShazeerWithJitterGradients) {
  MoEConfig cfg =
      small_config(AuxLossKind::shazeer, moe::Noise::learned, moe::NoiseScale::softplus, 2, 77);
  cfg.jitter = 0.2f;
  cfg.z_alpha = 0.0f;
  const int64_t T = 8, d = cfg.d_model, E = cfg.n_experts;
  MoELayer L(cfg);
  Rng rng(77);
  moe_test::randomize(L, rng);
  auto x = rng.vec(T * d, 1.0);
  const auto eps = rng.vec(T * E, 1.5);
  std::vector<float> y(static_cast<size_t>(T * cfg.out_dim())), dy(y.size(), 0.0f),
      dx(x.size());
  moe::ForwardOptions opt;
  opt.step = 5;
  opt.noise = eps.data();
  auto loss = [&](std::vector<int32_t>* idx) {
    L.forward(y.data(), x.data(), T, opt);
    if (idx) *idx = L.routing().indices;
    return L.aux_loss();
  };
  std::vector<int32_t> idx0;
  loss(&idx0);
  ASSERT_FALSE(L.routing().jitter.empty());
  L.zero_grad();
  L.backward(dx.data(), dy.data());
  const std::vector<float> dW = L.grad("W_noise").data;
  const float h = 1e-2f;
  auto fd = [&](float& v) {
    const float keep = v;
    std::vector<int32_t> i1, i2;
    v = keep + h;
    const double lp = loss(&i1);
    v = keep - h;
    const double lm = loss(&i2);
    v = keep;
    EXPECT_TRUE(i1 == idx0 && i2 == idx0) << "the step changed the routing";
    return (lp - lm) / (2.0 * h);
  };
  double worst = 0, scale = 1e-6;
  for (size_t i = 0; i < dW.size(); ++i) {
    const double f = fd(L.param("W_noise").data[i]);
    worst = std::max(worst, std::abs(f - dW[i]));
    scale = std::max(scale, std::abs(f));
  }
  EXPECT_LT(worst, 2e-2 * scale) << "dW_noise";
  worst = 0;
  scale = 1e-6;
  for (size_t i = 0; i < x.size(); ++i) {
    const double f = fd(x[i]);
    worst = std::max(worst, std::abs(f - dx[i]));
    scale = std::max(scale, std::abs(f));
  }
  EXPECT_LT(worst, 2e-2 * scale) << "dx";
}
