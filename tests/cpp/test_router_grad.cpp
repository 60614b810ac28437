// router_backward against central differences of the reference router run in double
// (router_forward_ref_t<double>), for a loss that reaches every term backward handles:
// L = Σ a·weights + Σ b·probs + Σ c·h (dweights = a, dprobs = b, dlogits = c).
// KeepTopK is piecewise constant: an entry is only checked where the ±step evaluations keep
// every token's selection (STYLE.md item 8).
#include <algorithm>
#include <cmath>

#include "router/router_ref.hpp"
#include "test_router_util.hpp"

using router_test::Case;

namespace {

struct Terms {
  bool weights = true, probs = true, logits = true;
};

struct Coefs {
  std::vector<float> a, b, c;  // (T, k), (T, E), (T, E)
};

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

struct Params64 {
  std::vector<double> x, W_g, b_g, W_noise;
};

double loss_ref(const Case& c, const Params64& q, const Coefs& co, const Terms& terms,
                bool training, std::vector<int32_t>* indices) {
  moe::detail::RouterRefOut<double> o;
  moe::detail::RouterRefParams<double> p;
  p.W_g = q.W_g.data();
  p.b_g = q.b_g.empty() ? nullptr : q.b_g.data();
  p.W_noise = q.W_noise.empty() ? nullptr : q.W_noise.data();
  moe::detail::router_forward_ref_t<double>(o, q.x.data(), p, c.cfg, c.T, training, c.noise());
  double L = 0.0;
  for (size_t i = 0; i < o.weights.size() && terms.weights; ++i) L += co.a[i] * o.weights[i];
  for (size_t i = 0; i < o.probs.size() && terms.probs; ++i) L += co.b[i] * o.probs[i];
  for (size_t i = 0; i < o.logits.size() && terms.logits; ++i) L += co.c[i] * o.logits[i];
  if (indices) *indices = o.indices;
  return L;
}

// Checks one parameter's analytic gradient (float) against central differences in double.
void check_param(const char* name, std::vector<double>& theta, const std::vector<float>& grad,
                 const Case& c, Params64& q, const Coefs& co, const Terms& terms, bool training,
                 const std::vector<int32_t>& base_idx) {
  SCOPED_TRACE(name);
  ASSERT_EQ(theta.size(), grad.size());
  const double h = 1e-5;
  std::vector<double> num(theta.size(), 0.0);
  std::vector<bool> ok(theta.size(), false);
  double scale = 0.0;
  size_t checked = 0;
  for (size_t i = 0; i < theta.size(); ++i) {
    const double keep = theta[i];
    std::vector<int32_t> ip, im;
    theta[i] = keep + h;
    const double lp = loss_ref(c, q, co, terms, training, &ip);
    theta[i] = keep - h;
    const double lm = loss_ref(c, q, co, terms, training, &im);
    theta[i] = keep;
    if (ip != base_idx || im != base_idx) continue;  // the step crosses the top-k kink
    num[i] = (lp - lm) / (2 * h);
    ok[i] = true;
    scale = std::max(scale, std::abs(num[i]));
    ++checked;
  }
  // Zero trust: the gradient must be there, and most entries checked.
  EXPECT_GT(scale, 1e-3);
  EXPECT_GE(checked, theta.size() * 9 / 10);
  // Float backward: each entry sums O(T + E) products with relative error ~2^-24 each.
  for (size_t i = 0; i < theta.size(); ++i)
    if (ok[i]) {
      EXPECT_NEAR(grad[i], num[i], 1e-4 * std::abs(num[i]) + 1e-5 * (1.0 + scale)) << "entry " << i;
    }
}

void check_gradients(const Case& c, bool training, const Terms& terms, uint32_t seed) {
  SCOPED_TRACE(c.name() + (training ? " training" : " evaluation") +
               (terms.weights ? " +weights" : "") + (terms.probs ? " +probs" : "") +
               (terms.logits ? " +logits" : ""));
  const int64_t T = c.T, d = c.cfg.d_model, E = c.cfg.n_experts, k = c.cfg.k;
  std::mt19937 rng(seed);
  Coefs co;
  co.a = router_test::normal_values(rng, static_cast<size_t>(T * k), 1.0f);
  co.b = router_test::normal_values(rng, static_cast<size_t>(T * E), 1.0f);
  co.c = router_test::normal_values(rng, static_cast<size_t>(T * E), 1.0f);

  // Analytic: the fast forward in float, then router_backward. Parameter gradients must
  // accumulate onto what is there (1.0) and dx must be assigned over garbage.
  moe::RouterState s = router_test::route(c, training, true);
  std::vector<float> dx(static_cast<size_t>(T * d), NAN);
  std::vector<float> dW_g(c.W_g.size(), 1.0f), db_g(c.b_g.size(), 1.0f),
      dW_noise(c.W_noise.size(), 1.0f);
  moe::RouterGrads g;
  g.dW_g = dW_g.data();
  g.db_g = c.b_g.empty() ? nullptr : db_g.data();
  g.dW_noise = c.W_noise.empty() ? nullptr : dW_noise.data();
  moe::router_backward(dx.data(), g, terms.weights ? co.a.data() : nullptr,
                       terms.probs ? co.b.data() : nullptr, terms.logits ? co.c.data() : nullptr,
                       s, c.x.data(), c.params(), c.cfg);
  for (auto* v : {&dW_g, &db_g, &dW_noise})
    for (float& e : *v) e -= 1.0f;

  Params64 q{to_double(c.x), to_double(c.W_g), to_double(c.b_g), to_double(c.W_noise)};
  std::vector<int32_t> base_idx;
  loss_ref(c, q, co, terms, training, &base_idx);
  ASSERT_EQ(base_idx, s.indices) << "float and double routing disagree: pick inputs off a tie";
  check_param("dx", q.x, dx, c, q, co, terms, training, base_idx);
  check_param("dW_g", q.W_g, dW_g, c, q, co, terms, training, base_idx);
  if (!c.b_g.empty()) check_param("db_g", q.b_g, db_g, c, q, co, terms, training, base_idx);
  if (!c.W_noise.empty() && training && c.cfg.noise == moe::Noise::learned)
    check_param("dW_noise", q.W_noise, dW_noise, c, q, co, terms, training, base_idx);
}

Case grad_case(int64_t E, int64_t k, moe::Noise noise, moe::NoiseScale scale, bool bias,
               bool given_eps, uint32_t seed) {
  return router_test::make_case(5, 4, E, k, noise, scale, bias, given_eps, false, seed);
}

}  // namespace

TEST(RouterBackward, EvaluationEachTermAlone) {
  const Case c = grad_case(7, 3, moe::Noise::none, moe::NoiseScale::softplus, true, false, 1);
  check_gradients(c, false, {true, false, false}, 10);
  check_gradients(c, false, {false, true, false}, 11);
  check_gradients(c, false, {false, false, true}, 12);
}

TEST(RouterBackward, FixedNoiseAllTerms) {
  const Case c = grad_case(6, 2, moe::Noise::fixed, moe::NoiseScale::softplus, false, false, 2);
  check_gradients(c, true, {}, 20);
}

TEST(RouterBackward, LearnedSoftplusNoiseThroughScale) {
  const Case c = grad_case(7, 3, moe::Noise::learned, moe::NoiseScale::softplus, true, true, 3);
  check_gradients(c, true, {}, 30);
  check_gradients(c, true, {true, false, false}, 31);  // the kept softmax alone
}

TEST(RouterBackward, LearnedLinearNoiseThroughScale) {
  const Case c = grad_case(7, 2, moe::Noise::learned, moe::NoiseScale::linear, true, true, 4);
  check_gradients(c, true, {}, 40);
}

TEST(RouterBackward, LearnedNoiseDrawnFromTheSeedKEqualsOneAndKEqualsE) {
  check_gradients(grad_case(6, 1, moe::Noise::learned, moe::NoiseScale::softplus, false, false, 5),
                  true, {}, 50);
  check_gradients(grad_case(5, 5, moe::Noise::learned, moe::NoiseScale::softplus, true, false, 6),
                  true, {}, 60);
}

TEST(RouterBackward, LearnedNoiseAtEvaluationHasNoNoiseGradient) {
  const Case c = grad_case(6, 2, moe::Noise::learned, moe::NoiseScale::softplus, true, false, 7);
  moe::RouterState s = router_test::route(c, false, true);
  std::vector<float> dW_g(c.W_g.size(), 0.0f), dW_noise(c.W_noise.size(), 0.0f);
  std::vector<float> dw(static_cast<size_t>(c.T * c.cfg.k), 1.0f);
  dw[0] = 2.0f;
  moe::RouterGrads g;
  g.dW_g = dW_g.data();
  g.dW_noise = dW_noise.data();
  moe::router_backward(nullptr, g, dw.data(), nullptr, nullptr, s, c.x.data(), c.params(), c.cfg);
  EXPECT_TRUE(std::all_of(dW_noise.begin(), dW_noise.end(), [](float v) { return v == 0.0f; }));
  EXPECT_TRUE(std::any_of(dW_g.begin(), dW_g.end(), [](float v) { return v != 0.0f; }));
}
