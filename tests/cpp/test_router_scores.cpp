// The router family's score functions, selection bias, group-limited selection and jitter
// (src/router/scores.hpp, docs/routing.md): the fast router against the reference twin,
// hand-computed cases, router_backward against central differences of the reference in
// double, and the layer's selection-bias state (update rule, checkpoints).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>

#include <omp.h>
#include <unistd.h>

#include "layer/layer_ref.hpp"
#include "moe/checkpoint.hpp"
#include "router/router_ref.hpp"
#include "test_layer_util.hpp"
#include "test_router_util.hpp"

using router_test::Case;

namespace {

struct Family {
  moe::RouterKind kind = moe::RouterKind::topk_softmax;
  bool renormalize = false;
  float scaling = 1.0f;
  bool bias = false;
  int64_t groups = 1, topk_groups = 1;
  moe::GroupScore group_score = moe::GroupScore::top2_sum;
  float jitter = 0.0f;

  std::string name() const {
    return std::string(" router=") + moe::to_string(kind) + (renormalize ? " renorm" : "") +
           " scale=" + std::to_string(scaling) + (bias ? " selbias" : "") +
           " groups=" + std::to_string(groups) + "/" + std::to_string(topk_groups) + " " +
           moe::to_string(group_score) +
           " jitter=" + std::to_string(jitter);
  }
};

// A router case with the family's options and a selection bias (sel, when set).
struct FCase {
  Case c;
  std::vector<float> sel;

  moe::RouterParams params() const {
    moe::RouterParams p = c.params();
    p.sel_bias = sel.empty() ? nullptr : sel.data();
    return p;
  }
  moe::RouterState route(bool training, bool fast, int64_t t0 = 0, int64_t n = -1) const {
    moe::RouterState s;
    const int64_t T = n < 0 ? c.T : n;
    const float* x = c.x.data() + t0 * c.cfg.d_model;
    moe::NoiseSource ns = c.noise(t0);
    if (ns.eps) ns.eps += t0 * c.cfg.n_experts;
    if (fast)
      moe::router_forward(s, x, params(), c.cfg, T, training, ns);
    else
      moe::router_forward_ref(s, x, params(), c.cfg, T, training, ns);
    return s;
  }
};

FCase make(int64_t T, int64_t d, int64_t E, int64_t k, moe::Noise noise, const Family& f,
           uint32_t seed) {
  FCase fc;
  fc.c = router_test::make_case(T, d, E, k, noise, moe::NoiseScale::softplus, false, true, false,
                                seed);
  moe::RouterConfig& cfg = fc.c.cfg;
  cfg.kind = f.kind;
  cfg.renormalize = f.renormalize;
  cfg.scaling_factor = f.scaling;
  cfg.n_groups = f.groups;
  cfg.topk_groups = f.topk_groups;
  cfg.group_score = f.group_score;
  cfg.jitter = f.jitter;
  if (f.bias) {
    std::mt19937 rng(seed + 1000);
    // Of the order of the scores' spread, so that the bias changes some selections.
    const float sd = f.kind == moe::RouterKind::softmax_topk ? 0.05f
                     : f.kind == moe::RouterKind::sigmoid    ? 0.2f
                                                             : 0.8f;
    fc.sel = router_test::normal_values(rng, static_cast<size_t>(E), sd);
  }
  return fc;
}

std::vector<Family> all_families() {
  std::vector<Family> out;
  for (auto kind : {moe::RouterKind::topk_softmax, moe::RouterKind::softmax_topk,
                    moe::RouterKind::sigmoid})
    for (bool renorm : {false, true}) {
      if (renorm && kind == moe::RouterKind::topk_softmax) continue;
      for (float scaling : {1.0f, 2.5f})
        for (bool bias : {false, true})
          for (int groups : {1, 4})
            for (float jitter : {0.0f, 0.3f})
              for (auto score : {moe::GroupScore::top2_sum, moe::GroupScore::max}) {
                if (groups == 1 && score == moe::GroupScore::max) continue;
                Family f;
                f.kind = kind;
                f.renormalize = renorm;
                f.scaling = scaling;
                f.bias = bias;
                f.groups = groups;
                f.topk_groups = groups > 1 ? 2 : 1;
                f.group_score = score;
                f.jitter = jitter;
                out.push_back(f);
              }
    }
  return out;
}

void expect_near_all(const std::vector<float>& a, const std::vector<float>& b, float tol,
                     const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << what << " " << i;
    EXPECT_NEAR(a[i], b[i], tol * (1.0f + std::abs(b[i]))) << what << " " << i;
  }
}

}  // namespace

// ---- forward: fast against the reference ----------------------------------------------------

TEST(RouterScoresFastVsRef, EveryCombination) {
  uint32_t seed = 100;
  for (const Family& f : all_families())
    for (auto noise : {moe::Noise::none, moe::Noise::learned})
      for (bool training : {false, true}) {
        const FCase fc = make(37, 12, 16, 3, noise, f, ++seed);
        SCOPED_TRACE(fc.c.name() + f.name() + (training ? " training" : " eval"));
        const moe::RouterState a = fc.route(training, true), b = fc.route(training, false);
        ASSERT_EQ(a.indices, b.indices);
        expect_near_all(a.weights, b.weights, 2e-6f, "weights");
        expect_near_all(a.probs, b.probs, 2e-6f, "probs");
        expect_near_all(a.scores, b.scores, 2e-6f, "scores");
        EXPECT_EQ(a.jitter, b.jitter);  // the same draws, bit for bit
        EXPECT_EQ(a.jitter.empty(), !(training && f.jitter > 0.0f));
        EXPECT_EQ(a.scores.empty(), f.kind != moe::RouterKind::sigmoid);
        // Zero trust: the weights are there, and the scaling shows in their sums.
        for (int64_t t = 0; t < fc.c.T; ++t) {
          float sum = 0.0f;
          for (int64_t j = 0; j < 3; ++j) sum += a.weights[t * 3 + j];
          EXPECT_GT(sum, 0.0f);
          if (f.kind == moe::RouterKind::topk_softmax || f.renormalize) {
            EXPECT_NEAR(sum, f.scaling, 1e-5f * f.scaling);
          }
        }
      }
}

TEST(RouterScoresFastVsRef, LargeKUsesTheHeapAndKEqualsE) {
  for (int64_t k : {int64_t{20}, int64_t{40}}) {
    Family f;
    f.kind = moe::RouterKind::sigmoid;
    f.renormalize = true;
    f.bias = true;
    const FCase fc = make(9, 8, 40, k, moe::Noise::none, f, 7);
    const moe::RouterState a = fc.route(false, true), b = fc.route(false, false);
    ASSERT_EQ(a.indices, b.indices);
    expect_near_all(a.weights, b.weights, 2e-6f, "weights");
  }
}

TEST(RouterScoresDeterminism, BatchSplitAndThreadsBitIdentical) {
  Family f;
  f.kind = moe::RouterKind::sigmoid;
  f.renormalize = true;
  f.bias = true;
  f.groups = 4;
  f.topk_groups = 2;
  f.jitter = 0.2f;
  FCase fc = make(53, 16, 16, 4, moe::Noise::learned, f, 11);
  fc.c.eps.clear();  // ε drawn from the seed, like the jitter
  const moe::RouterState whole = fc.route(true, true);
  const moe::RouterState lo = fc.route(true, true, 0, 20), hi = fc.route(true, true, 20, 33);
  auto cat = [](const auto& a, const auto& b) {
    auto v = a;
    v.insert(v.end(), b.begin(), b.end());
    return v;
  };
  EXPECT_EQ(whole.indices, cat(lo.indices, hi.indices));
  EXPECT_EQ(whole.weights, cat(lo.weights, hi.weights));
  EXPECT_EQ(whole.probs, cat(lo.probs, hi.probs));
  EXPECT_EQ(whole.jitter, cat(lo.jitter, hi.jitter));
}

// ---- forward: hand-computed cases ----------------------------------------------------------

namespace {

// One token whose logits h are given directly: d = E, x = 1-hot rows... simpler: x = (1),
// W_g = h (d = 1), so that h = W_g.
FCase logits_case(const std::vector<float>& h, int64_t k, const Family& f) {
  FCase fc;
  moe::RouterConfig& cfg = fc.c.cfg;
  cfg.d_model = 1;
  cfg.n_experts = static_cast<int64_t>(h.size());
  cfg.k = k;
  cfg.kind = f.kind;
  cfg.renormalize = f.renormalize;
  cfg.scaling_factor = f.scaling;
  cfg.n_groups = f.groups;
  cfg.topk_groups = f.topk_groups;
  cfg.group_score = f.group_score;
  fc.c.T = 1;
  fc.c.x = {1.0f};
  fc.c.W_g = h;
  return fc;
}

double sigm(double z) { return 1.0 / (1.0 + std::exp(-z)); }

}  // namespace

TEST(RouterScores, SoftmaxTopkIsTheFullSoftmaxAtTheKept) {
  const std::vector<float> h{0.3f, -1.0f, 2.0f, 0.9f, 0.1f};
  Family f;
  f.kind = moe::RouterKind::softmax_topk;
  f.scaling = 1.5f;
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(h, 2, f).route(false, fast);
    double Z = 0;
    for (float v : h) Z += std::exp(double(v));
    EXPECT_EQ(s.indices, (std::vector<int32_t>{2, 3}));
    EXPECT_NEAR(s.weights[0], 1.5 * std::exp(2.0) / Z, 1e-6);
    EXPECT_NEAR(s.weights[1], 1.5 * std::exp(0.9) / Z, 1e-6);
    EXPECT_NEAR(s.probs[2], std::exp(2.0) / Z, 1e-6);
  }
  // With renormalize it is the default router's softmax over the kept (Mixtral).
  f.renormalize = true;
  f.scaling = 1.0f;
  Family def;
  const moe::RouterState a = logits_case(h, 3, f).route(false, true);
  const moe::RouterState b = logits_case(h, 3, def).route(false, true);
  EXPECT_EQ(a.indices, b.indices);
  expect_near_all(a.weights, b.weights, 1e-6f, "weights");
}

TEST(RouterScores, SigmoidWeightsAndProbs) {
  const std::vector<float> h{0.3f, -1.0f, 2.0f, 0.9f, 0.1f, -0.2f};
  Family f;
  f.kind = moe::RouterKind::sigmoid;
  for (bool renorm : {false, true})
    for (bool fast : {true, false}) {
      f.renormalize = renorm;
      f.scaling = 2.0f;
      const moe::RouterState s = logits_case(h, 3, f).route(false, fast);
      EXPECT_EQ(s.indices, (std::vector<int32_t>{2, 3, 0}));
      const double s0 = sigm(2.0), s1 = sigm(0.9), s2 = sigm(0.3);
      const double Z = renorm ? s0 + s1 + s2 : 1.0;
      EXPECT_NEAR(s.weights[0], 2.0 * s0 / Z, 1e-6);
      EXPECT_NEAR(s.weights[1], 2.0 * s1 / Z, 1e-6);
      EXPECT_NEAR(s.weights[2], 2.0 * s2 / Z, 1e-6);
      double ssum = 0;
      for (float v : h) ssum += sigm(v);
      for (size_t e = 0; e < h.size(); ++e) {
        EXPECT_NEAR(s.probs[e], sigm(h[e]) / ssum, 1e-6);
        EXPECT_NEAR(s.scores[e], sigm(h[e]), 1e-6);
      }
    }
}

TEST(RouterScores, SelectionBiasChoosesButNeverWeighs) {
  const std::vector<float> h{1.0f, 0.5f, 0.0f, -0.5f};
  Family f;
  f.kind = moe::RouterKind::sigmoid;
  for (bool fast : {true, false}) {
    FCase fc = logits_case(h, 2, f);
    fc.sel = {0.0f, 0.0f, 0.0f, 1.0f};  // lifts expert 3 above all
    const moe::RouterState s = fc.route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{3, 0}));
    EXPECT_NEAR(s.weights[0], sigm(-0.5), 1e-6);
    EXPECT_NEAR(s.weights[1], sigm(1.0), 1e-6);
  }
  // The default router: selection on H + b, the kept softmax over H alone.
  Family def;
  FCase fc = logits_case(h, 2, def);
  fc.sel = {0.0f, -1.0f, 0.0f, 2.0f};
  for (bool fast : {true, false}) {
    const moe::RouterState s = fc.route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{3, 0}));
    const double z = std::exp(-0.5) + std::exp(1.0);
    EXPECT_NEAR(s.weights[0], std::exp(-0.5) / z, 1e-6);
  }
}

TEST(RouterScores, GroupsPickTheBestTopTwoSums) {
  // Groups {0,1}, {2,3}, {4,5}: top-2 sums 1.0+(-3) = -2, 0.6+0.5 = 1.1, 0.7+0.2 = 0.9.
  // With one group the best single expert (0) is not eligible.
  const std::vector<float> h{1.0f, -3.0f, 0.6f, 0.5f, 0.7f, 0.2f};
  Family f;
  f.groups = 3;
  f.topk_groups = 1;
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(h, 2, f).route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{2, 3}));
  }
  f.topk_groups = 2;
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(h, 3, f).route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{4, 2, 3}));
  }
  // Groups of one expert score that expert; tied group scores go to the higher index.
  f.groups = 6;
  f.topk_groups = 1;
  const std::vector<float> tie{0.0f, 0.4f, 0.4f, -1.0f, 0.1f, 0.2f};
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(tie, 1, f).route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{2}));
  }
  // group_score max (DeepSeek-V2): groups score their best, 1.0, 0.6, 0.7, so group {0, 1}
  // wins where the top-2 sums put it last.
  f.groups = 3;
  f.topk_groups = 1;
  f.group_score = moe::GroupScore::max;
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(h, 2, f).route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{0, 1}));
  }
  f.topk_groups = 2;
  for (bool fast : {true, false}) {
    const moe::RouterState s = logits_case(h, 3, f).route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{0, 4, 5}));
  }
  f.group_score = moe::GroupScore::top2_sum;
  // Groups with the selection bias: group {0, 1} wins once biased.
  f.groups = 3;
  f.topk_groups = 1;
  FCase fc = logits_case(h, 1, f);
  fc.sel = {0.0f, 3.5f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (bool fast : {true, false}) {
    const moe::RouterState s = fc.route(false, fast);
    EXPECT_EQ(s.indices, (std::vector<int32_t>{0}));
  }
}

TEST(RouterScores, JitterOnlyInTrainingAndWithinItsRange) {
  Family f;
  f.jitter = 0.25f;
  const FCase fc = make(64, 32, 8, 2, moe::Noise::none, f, 5);
  const moe::RouterState ev = fc.route(false, true);
  EXPECT_TRUE(ev.jitter.empty());
  const moe::RouterState tr = fc.route(true, true);
  ASSERT_EQ(tr.jitter.size(), size_t{64 * 32});
  float lo = 2.0f, hi = 0.0f;
  double mean = 0;
  for (float u : tr.jitter) {
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    mean += u;
  }
  mean /= static_cast<double>(tr.jitter.size());
  EXPECT_GE(lo, 0.75f);
  EXPECT_LT(hi, 1.25f);
  EXPECT_LT(lo, 0.76f);  // the whole range is used
  EXPECT_GT(hi, 1.24f);
  EXPECT_NEAR(mean, 1.0, 0.02);
  // h is x·u·W_g: differs from the evaluation logits, and equals the reference's.
  EXPECT_NE(tr.logits, ev.logits);
  // Another step draws other factors.
  FCase other = fc;
  other.c.step += 1;
  EXPECT_NE(other.route(true, true).jitter, tr.jitter);
}

TEST(RouterScores, ConfigErrorsNameTheField) {
  moe::RouterConfig cfg;
  cfg.d_model = 2;
  cfg.n_experts = 6;
  cfg.k = 2;
  cfg.n_groups = 4;
  EXPECT_NE(router_test::error_of([&] { cfg.validate(); }).find("n_groups"), std::string::npos);
  cfg.n_groups = 3;
  cfg.topk_groups = 4;
  EXPECT_NE(router_test::error_of([&] { cfg.validate(); }).find("topk_groups"),
            std::string::npos);
  cfg.topk_groups = 1;
  cfg.k = 3;
  EXPECT_NE(router_test::error_of([&] { cfg.validate(); }).find("k:"), std::string::npos);
  cfg.k = 2;
  cfg.jitter = 1.0f;
  EXPECT_NE(router_test::error_of([&] { cfg.validate(); }).find("jitter"), std::string::npos);
  cfg.jitter = 0.0f;
  cfg.scaling_factor = 0.0f;
  EXPECT_NE(router_test::error_of([&] { cfg.validate(); }).find("scaling_factor"),
            std::string::npos);
}

// ---- backward: central differences of the reference in double ------------------------------

namespace {

struct P64 {
  std::vector<double> x, W_g, W_noise;
};

std::vector<double> to_d(const std::vector<float>& v) { return {v.begin(), v.end()}; }

double loss64(const FCase& fc, const P64& q, const std::vector<float>& a,
              const std::vector<float>& b, const std::vector<float>& c, bool training,
              std::vector<int32_t>* idx) {
  moe::detail::RouterRefOut<double> o;
  moe::detail::RouterRefParams<double> p;
  p.W_g = q.W_g.data();
  p.W_noise = q.W_noise.empty() ? nullptr : q.W_noise.data();
  p.sel_bias = fc.sel.empty() ? nullptr : fc.sel.data();
  moe::detail::router_forward_ref_t<double>(o, q.x.data(), p, fc.c.cfg, fc.c.T, training,
                                            fc.c.noise());
  double L = 0;
  for (size_t i = 0; i < o.weights.size(); ++i) L += a[i] * o.weights[i];
  for (size_t i = 0; i < o.probs.size(); ++i) L += b[i] * o.probs[i];
  for (size_t i = 0; i < o.logits.size(); ++i) L += c[i] * o.logits[i];
  if (idx) *idx = o.indices;
  return L;
}

void check_family_gradients(const FCase& fc, bool training, uint32_t seed) {
  SCOPED_TRACE(fc.c.name() + (training ? " training" : " eval"));
  const int64_t T = fc.c.T, d = fc.c.cfg.d_model, E = fc.c.cfg.n_experts, k = fc.c.cfg.k;
  std::mt19937 rng(seed);
  const auto a = router_test::normal_values(rng, static_cast<size_t>(T * k), 1.0f);
  const auto b = router_test::normal_values(rng, static_cast<size_t>(T * E), 1.0f);
  const auto c = router_test::normal_values(rng, static_cast<size_t>(T * E), 1.0f);

  const moe::RouterState s = fc.route(training, true);
  std::vector<float> dx(static_cast<size_t>(T * d), NAN), dW_g(fc.c.W_g.size(), 0.0f),
      dW_noise(fc.c.W_noise.size(), 0.0f);
  moe::RouterGrads g;
  g.dW_g = dW_g.data();
  g.dW_noise = fc.c.W_noise.empty() ? nullptr : dW_noise.data();
  moe::router_backward(dx.data(), g, a.data(), b.data(), c.data(), s, fc.c.x.data(),
                       fc.params(), fc.c.cfg);

  P64 q{to_d(fc.c.x), to_d(fc.c.W_g), to_d(fc.c.W_noise)};
  std::vector<int32_t> base;
  loss64(fc, q, a, b, c, training, &base);
  ASSERT_EQ(base, s.indices) << "float and double routing disagree";
  auto check = [&](const char* name, std::vector<double>& theta, const std::vector<float>& grad) {
    SCOPED_TRACE(name);
    const double h = 1e-5;
    double scale = 0;
    size_t checked = 0;
    std::vector<double> num(theta.size());
    std::vector<bool> ok(theta.size(), false);
    for (size_t i = 0; i < theta.size(); ++i) {
      const double keep = theta[i];
      std::vector<int32_t> ip, im;
      theta[i] = keep + h;
      const double lp = loss64(fc, q, a, b, c, training, &ip);
      theta[i] = keep - h;
      const double lm = loss64(fc, q, a, b, c, training, &im);
      theta[i] = keep;
      if (ip != base || im != base) continue;  // the step crosses a selection kink
      num[i] = (lp - lm) / (2 * h);
      ok[i] = true;
      scale = std::max(scale, std::abs(num[i]));
      ++checked;
    }
    EXPECT_GT(scale, 1e-3);
    EXPECT_GE(checked, theta.size() * 9 / 10);
    for (size_t i = 0; i < theta.size(); ++i)
      if (ok[i]) {
        EXPECT_NEAR(grad[i], num[i], 1e-4 * std::abs(num[i]) + 1e-5 * (1.0 + scale)) << i;
      }
  };
  check("dx", q.x, dx);
  check("dW_g", q.W_g, dW_g);
  if (training && fc.c.cfg.noise == moe::Noise::learned) check("dW_noise", q.W_noise, dW_noise);
}

}  // namespace

TEST(RouterScoresBackward, EveryScoreFunctionRenormalizeAndScaling) {
  uint32_t seed = 300;
  for (auto kind : {moe::RouterKind::topk_softmax, moe::RouterKind::softmax_topk,
                    moe::RouterKind::sigmoid})
    for (bool renorm : {false, true})
      for (float scaling : {1.0f, 2.5f}) {
        if (renorm && kind == moe::RouterKind::topk_softmax) continue;
        Family f;
        f.kind = kind;
        f.renormalize = renorm;
        f.scaling = scaling;
        SCOPED_TRACE(f.name());
        seed += 2;
        check_family_gradients(make(5, 4, 7, 3, moe::Noise::learned, f, seed), true, seed);
        check_family_gradients(make(5, 4, 7, 1, moe::Noise::none, f, seed + 1), false, seed + 1);
      }
}

TEST(RouterScoresBackward, BiasGroupsAndJitter) {
  uint32_t seed = 400;
  for (auto kind : {moe::RouterKind::topk_softmax, moe::RouterKind::softmax_topk,
                    moe::RouterKind::sigmoid}) {
    Family f;
    f.kind = kind;
    f.renormalize = kind != moe::RouterKind::topk_softmax;
    f.bias = true;
    f.groups = 4;
    f.topk_groups = 2;
    f.jitter = 0.3f;
    SCOPED_TRACE(f.name());
    seed += 2;
    check_family_gradients(make(5, 4, 8, 3, moe::Noise::learned, f, seed), true, seed);
    f.bias = false;
    f.groups = 1;
    f.topk_groups = 1;
    check_family_gradients(make(5, 4, 8, 2, moe::Noise::learned, f, seed + 1), true, seed + 1);
  }
}

// ---- the layer's selection bias -------------------------------------------------------------

namespace {

moe::MoEConfig bias_config() {
  moe::MoEConfig c;
  c.d_model = 6;
  c.n_experts = 4;
  c.k = 2;
  c.d_ff = 8;
  c.router_kind = moe::RouterKind::sigmoid;
  c.bias_update_rate = 0.125f;
  c.router_init_std = 0.5f;
  c.noise = moe::Noise::none;
  c.seed = 3;
  return c;
}

}  // namespace

TEST(LayerExpertBias, UpdateFollowsTheSignOfTheLoadGap) {
  moe::MoELayer layer(bias_config());
  const int64_t T = 13, E = 4;
  std::mt19937 rng(1);
  const auto x = router_test::normal_values(rng, static_cast<size_t>(T * 6), 1.0f);
  std::vector<float> y(static_cast<size_t>(T * 6));
  EXPECT_EQ(layer.expert_bias().data, std::vector<float>(E, 0.0f));
  layer.update_expert_bias();  // no training forward yet: nothing happens
  EXPECT_EQ(layer.expert_bias().data, std::vector<float>(E, 0.0f));
  std::vector<float> want(E, 0.0f);
  for (int step = 0; step < 3; ++step) {
    moe::ForwardOptions opt;
    opt.step = static_cast<uint64_t>(step);
    layer.forward(y.data(), x.data(), T, opt);
    const auto load = layer.stats().load_before;
    const double mean = double(T * 2) / E;
    for (int64_t e = 0; e < E; ++e)
      want[e] += load[e] < mean ? 0.125f : load[e] > mean ? -0.125f : 0.0f;
    // The selection used the bias of before this step; an evaluation forward does not count.
    moe::ForwardOptions ev;
    ev.training = false;
    layer.forward(y.data(), x.data(), T, ev);
    layer.update_expert_bias();
    EXPECT_EQ(layer.expert_bias().data, want) << "step " << step;
    layer.update_expert_bias();  // consumed: a second call does nothing
    EXPECT_EQ(layer.expert_bias().data, want);
  }
  EXPECT_TRUE(std::any_of(want.begin(), want.end(), [](float v) { return v != 0.0f; }));
}

TEST(LayerExpertBias, SteersSelectionButNotTheWeights) {
  moe::MoELayer layer(bias_config());
  const int64_t T = 5;
  std::mt19937 rng(2);
  const auto x = router_test::normal_values(rng, static_cast<size_t>(T * 6), 1.0f);
  std::vector<float> y(static_cast<size_t>(T * 6));
  moe::ForwardOptions ev;
  ev.training = false;
  layer.expert_bias().data = {0.0f, 0.0f, 10.0f, 10.0f};
  layer.forward(y.data(), x.data(), T, ev);
  const moe::RouterState& r = layer.routing();
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_GE(r.indices[t * 2], 2);
    EXPECT_GE(r.indices[t * 2 + 1], 2);
    for (int64_t j = 0; j < 2; ++j)
      EXPECT_NEAR(r.weights[t * 2 + j], r.scores[t * 4 + r.indices[t * 2 + j]], 1e-7);
  }
}

TEST(LayerExpertBias, CheckpointKeepsTheBiasAndOldFilesLoadZeros) {
  const std::string dir = testing::TempDir();
  const std::string with = dir + "/scores_bias_" + std::to_string(getpid()) + ".safetensors";
  const std::string without = dir + "/scores_nobias_" + std::to_string(getpid()) + ".safetensors";
  moe::MoELayer a(bias_config());
  a.expert_bias().data = {0.5f, -0.25f, 0.0f, 1.0f};
  moe::save_checkpoint(a, with);
  moe::MoELayer b(bias_config());
  moe::load_checkpoint(b, with);
  EXPECT_EQ(b.expert_bias().data, a.expert_bias().data);
  EXPECT_EQ(moe::read_checkpoint_config(with).bias_update_rate, 0.125f);
  // A checkpoint of a layer without the bias (as before the option existed) loads as zeros.
  moe::MoEConfig off = bias_config();
  off.bias_update_rate = 0.0f;
  moe::MoELayer c(off);
  moe::save_checkpoint(c, without);
  EXPECT_EQ(moe::load_safetensors(without).find("expert_bias"), nullptr);
  moe::load_checkpoint(b, without);
  EXPECT_EQ(b.expert_bias().data, std::vector<float>(4, 0.0f));
  std::remove(with.c_str());
  std::remove(without.c_str());
}

// ---- the layer: fast against its reference twin in double ----------------------------------

TEST(LayerScoresFastVsRef, ScoreFunctionsScalingAndGroups) {
  struct Opt {
    moe::RouterKind kind;
    bool renorm;
    float scaling;
    int64_t groups, topk_groups;
  };
  const Opt opts[] = {{moe::RouterKind::softmax_topk, false, 1.0f, 1, 1},
                      {moe::RouterKind::softmax_topk, true, 2.0f, 3, 2},
                      {moe::RouterKind::sigmoid, false, 1.0f, 1, 1},
                      {moe::RouterKind::sigmoid, true, 2.5f, 3, 2},
                      {moe::RouterKind::topk_softmax, false, 1.5f, 6, 4}};
  int n = 0;
  for (const Opt& o : opts)
    for (auto noise : {moe::Noise::none, moe::Noise::learned}) {
      moe::MoEConfig cfg;
      cfg.d_model = 7;
      cfg.n_experts = 6;
      cfg.k = 2;
      cfg.d_ff = 5;
      cfg.expert = n % 2 ? moe::ExpertKind::swiglu : moe::ExpertKind::mlp;
      cfg.noise = noise;
      cfg.aux_alpha = 0.3f;
      cfg.z_alpha = 0.05f;
      cfg.router_kind = o.kind;
      cfg.renormalize = o.renorm;
      cfg.scaling_factor = o.scaling;
      cfg.n_groups = o.groups;
      cfg.topk_groups = o.topk_groups;
      cfg.seed = 40 + n;
      SCOPED_TRACE(std::string(moe::to_string(o.kind)) + " case " + std::to_string(n));
      moe::MoELayer L(cfg);
      moe_test::Rng rng(700 + n++);
      moe_test::randomize(L, rng);
      const int64_t T = 23;
      const auto x = rng.vec(T * 7, 1.0);
      const auto dy = rng.vec(T * 7, 1.0);
      std::vector<float> y(static_cast<size_t>(T * 7)), dx(x.size());
      L.zero_grad();
      L.forward(y.data(), x.data(), T);
      L.backward(dx.data(), dy.data());

      moe_test::RefRun r;
      ASSERT_NO_FATAL_FAILURE(moe_test::run_reference(r, L, x, dy, T));
      moe_test::expect_close(y, r.y, 1e-5, 1e-4, "y");
      moe_test::expect_close(dx, r.dx, 3e-5, 3e-4, "dx");
      for (const auto& name : L.parameter_names())
        moe_test::expect_close(L.grad(name).data, r.grads.get(name), 3e-5, 3e-4, "d" + name,
                               0.0);
    }
}

TEST(LayerScoresDeterminism, OneAndTwoThreadsBitIdentical) {
  moe::MoEConfig cfg;
  cfg.d_model = 24;
  cfg.n_experts = 16;
  cfg.k = 4;
  cfg.d_ff = 32;
  cfg.router_kind = moe::RouterKind::sigmoid;
  cfg.renormalize = true;
  cfg.scaling_factor = 2.5f;
  cfg.n_groups = 4;
  cfg.topk_groups = 2;
  cfg.bias_update_rate = 0.01f;
  cfg.jitter = 0.1f;
  cfg.router_init_std = 0.5f;
  cfg.seed = 9;
  const int64_t T = 300;
  moe_test::Rng rng(5);
  const auto x = rng.vec(T * 24, 1.0);
  const auto dy = rng.vec(T * 24, 1.0);
  struct Out {
    std::vector<float> y, dx, bias;
    std::vector<std::vector<float>> g;
  };
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    moe::MoELayer L(cfg);
    Out o;
    o.y.resize(static_cast<size_t>(T * 24));
    o.dx.resize(x.size());
    for (int step = 0; step < 2; ++step) {
      moe::ForwardOptions opt;
      opt.step = static_cast<uint64_t>(step);
      L.zero_grad();
      L.forward(o.y.data(), x.data(), T, opt);
      L.backward(o.dx.data(), dy.data());
      L.update_expert_bias();
    }
    for (const auto& n : L.parameter_names()) o.g.push_back(L.grad(n).data);
    o.bias = L.expert_bias().data;
    omp_set_num_threads(before);
    return o;
  };
  const Out a = run(1), b = run(2);
  EXPECT_EQ(a.y, b.y);
  EXPECT_EQ(a.dx, b.dx);
  EXPECT_EQ(a.g, b.g);
  EXPECT_EQ(a.bias, b.bias);
}

// docs/errors.md rows RS1 and RS2 (C++ column).
TEST(Errors, RS1_RouterFamilyOptionsNamed) {
  auto err = [](auto mutate) {
    moe::MoEConfig c;
    c.d_model = 4;
    c.n_experts = 6;
    c.k = 2;
    mutate(c);
    return router_test::error_of([&] { c.validate(); });
  };
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.scaling_factor = -1.0f; }),
            "scaling_factor: must be finite and > 0, got -1");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.n_groups = 4; }),
            "n_groups: must divide n_experts (6), got 4");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.n_groups = 3, c.topk_groups = 0; }),
            "topk_groups: must be in 1..3 (n_groups), got 0");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.n_groups = 3, c.k = 3; }),
            "k: must be at most topk_groups * experts per group (2), got 3");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.jitter = 1.0f; }), "jitter: must be in [0, 1), got 1");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.bias_update_rate = -0.5f; }),
            "bias_update_rate: must be finite and >= 0 (0: off), got -0.5");
  EXPECT_EQ(err([](moe::MoEConfig& c) { c.renormalize = true; }),
            "renormalize: applies to router softmax_topk or sigmoid, not topk_softmax");
}

TEST(Errors, RS2_SelectionBiasShapeAndValues) {
  moe::MoELayer L(bias_config());
  std::vector<float> x(4 * 6, 0.5f), y(4 * 6);
  L.expert_bias().data = {0.0f, NAN, 0.0f, 0.0f};
  EXPECT_EQ(router_test::error_of([&] { L.forward(y.data(), x.data(), 4); }),
            "expert_bias: non-finite value at expert 1");
  L.expert_bias() = moe::Tensor({3});
  EXPECT_EQ(router_test::error_of([&] { L.forward(y.data(), x.data(), 4); }),
            "expert_bias: expected 4 values, got 3");
  L.expert_bias() = moe::Tensor({4});
  L.forward(y.data(), x.data(), 4);
}

// ---- rounding as transformers: bf16 logits, torch's tie order, bf16 weights -------------------

// Logits rounded to bf16 tie often at the k-th place; tie_break torch must then agree between
// the fast row and the reference, and differ from both fixed orders somewhere.
TEST(RouterScoresRounded, BothPathsRoundAndBreakTiesAsTorch) {
  for (auto kind : {moe::RouterKind::topk_softmax, moe::RouterKind::softmax_topk,
                    moe::RouterKind::sigmoid})
    for (bool renorm : {false, true}) {
      if (renorm && kind == moe::RouterKind::topk_softmax) continue;
      Family f;
      f.kind = kind;
      f.renormalize = renorm;
      FCase fc = make(200, 8, 128, 8, moe::Noise::none, f, 42);
      // Inputs on a coarse grid: many logits fall on the same bf16 value.
      for (float& v : fc.c.x) v = std::round(v * 2.0f) / 2.0f;
      fc.c.cfg.round_logits = true;
      fc.c.cfg.round_weights = true;
      fc.c.cfg.tie_break = moe::TieBreak::torch;
      SCOPED_TRACE(f.name());
      const moe::RouterState a = fc.route(false, true), b = fc.route(false, false);
      ASSERT_EQ(a.indices, b.indices);
      expect_near_all(a.weights, b.weights, 4e-3f, "weights");  // a bf16 step
      for (float h : a.logits) ASSERT_EQ(h, moe::detail::round_bf16(h));
      for (float w : a.weights) ASSERT_EQ(w, moe::detail::round_bf16(w));
      int differs_high = 0, differs_low = 0;
      for (auto tb : {moe::TieBreak::high, moe::TieBreak::low}) {
        FCase g = fc;
        g.c.cfg.tie_break = tb;
        const moe::RouterState c = g.route(false, true);
        (tb == moe::TieBreak::high ? differs_high : differs_low) += c.indices != a.indices;
      }
      EXPECT_EQ(differs_high + differs_low, 2) << "no tie decided differently: a vacuous case";
    }
}

TEST(RouterScoresRounded, TorchTieBreakNeedsTokenChoiceWithoutGroups) {
  moe::MoEConfig c;
  c.d_model = 8;
  c.n_experts = 8;
  c.k = 2;
  c.tie_break = moe::TieBreak::torch;
  c.validate();
  c.n_groups = 2;
  EXPECT_THROW(c.validate(), moe::Error);
  c.n_groups = 1;
  c.router_kind = moe::RouterKind::expert_choice;
  EXPECT_THROW(c.validate(), moe::Error);
  c.router_kind = moe::RouterKind::topk_softmax;
  c.round_each_op = true;
  EXPECT_THROW(c.validate(), moe::Error);  // needs precision bf16
  c.precision = moe::Precision::bf16;
  c.validate();
}
