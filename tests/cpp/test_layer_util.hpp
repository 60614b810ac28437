// Shared pieces of the layer tests: random configurations, tolerance checks with a
// zero-trust guard (STYLE.md item 7), and conversions between the fast layer and its
// reference twin.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "layer/layer_ref.hpp"
#include "moe/moe.hpp"

namespace moe_test {

// Counter-free uniform numbers for test data: a fixed LCG so that data are the same on
// every platform (std::uniform_real_distribution is implementation-defined).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  double uniform() {  // [0, 1)
    s_ = s_ * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(s_ >> 11) * (1.0 / 9007199254740992.0);
  }
  double sym(double a) { return (2.0 * uniform() - 1.0) * a; }  // [-a, a)
  int64_t below(int64_t n) { return static_cast<int64_t>(uniform() * static_cast<double>(n)); }
  std::vector<float> vec(int64_t n, double a) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = static_cast<float>(sym(a));
    return v;
  }

 private:
  uint64_t s_;
};

// Fills every parameter of a layer with U(-a, a) scaled by 1/sqrt(fan-in)-ish widths so that
// activations stay O(1); biases get non-zero values too, so that their paths are exercised.
inline void randomize(moe::MoELayer& layer, Rng& rng, double a = 1.0) {
  for (const auto& n : layer.parameter_names()) {
    moe::Tensor& t = layer.param(n);
    const double fan = t.shape.size() >= 2 ? static_cast<double>(t.shape[t.shape.size() - 2]) : 4.0;
    const double scale = (n == "W_g" || n == "W_noise") ? a : a * 1.5 / std::sqrt(fan);
    for (auto& v : t.data) v = static_cast<float>(rng.sym(scale));
  }
}

template <typename S, typename U>
std::vector<S> convert(const std::vector<U>& v) {
  return std::vector<S>(v.begin(), v.end());
}

// |got - want| <= atol + rtol·|want| everywhere, nothing non-finite, and at least min_nonzero
// of want's entries non-zero: a comparison that passes only because everything is zero
// (dropped tokens, dead ReLUs, an output never written) must fail.
template <typename A, typename B>
void expect_close(const std::vector<A>& got, const std::vector<B>& want, double atol, double rtol,
                  const std::string& what, double min_nonzero = 0.3) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t nonzero = 0, bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    ASSERT_TRUE(std::isfinite(g)) << what << "[" << i << "] is " << g;
    ASSERT_TRUE(std::isfinite(w)) << what << " (reference)[" << i << "] is " << w;
    if (std::abs(w) > 1e-6) ++nonzero;
    if (std::abs(g - w) > atol + rtol * std::abs(w)) {
      if (++bad <= 5)
        ADD_FAILURE() << what << "[" << i << "]: got " << g << ", want " << w << " (diff "
                      << g - w << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " entries out of tolerance";
  if (!got.empty()) {
    EXPECT_GE(static_cast<double>(nonzero), min_nonzero * static_cast<double>(got.size()))
        << what << ": only " << nonzero << " of " << got.size()
        << " reference entries are non-zero (zero-trust)";
  }
}

// max |got - want| / max |want|, nothing non-finite; want must not be all zeros.
template <typename A, typename B>
double rel_max_err(const std::vector<A>& got, const std::vector<B>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    EXPECT_TRUE(std::isfinite(g)) << "entry " << i << " is " << g;
    num = std::max(num, std::abs(g - w));
    den = std::max(den, std::abs(w));
  }
  if (got.empty()) return 0.0;
  EXPECT_GT(den, 0.0) << "the reference is all zeros";
  return den > 0.0 ? num / den : num;
}

// ‖got − want‖ / ‖want‖ (Frobenius), nothing non-finite; most of want must be non-zero.
template <typename A, typename B>
double rel_fro(const std::vector<A>& got, const std::vector<B>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0.0, den = 0.0;
  size_t nonzero = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    EXPECT_TRUE(std::isfinite(g)) << "entry " << i << " is " << g;
    num += (g - w) * (g - w);
    den += w * w;
    nonzero += w != 0.0;
  }
  EXPECT_GT(nonzero, want.size() / 2) << "the reference is mostly zeros";
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The layer's evaluation forward of the T tokens x.
inline std::vector<float> eval_forward(moe::MoELayer& layer, const std::vector<float>& x,
                                       int64_t T) {
  std::vector<float> y(static_cast<size_t>(T * layer.config().out_dim()));
  moe::ForwardOptions opt;
  opt.training = false;
  layer.forward(y.data(), x.data(), T, opt);
  return y;
}

// The float64 reference twin on the layer's parameters: the forward of x with the routing
// noise ε the layer's last forward drew (which must route as the layer did), then the
// backward of dy. Call under ASSERT_NO_FATAL_FAILURE.
struct RefRun {
  std::vector<double> y, dx;
  moe::detail::RefParams<double> grads;  // named as the layer's parameters
};
inline void run_reference(RefRun& r, const moe::MoELayer& L, const std::vector<float>& x,
                          const std::vector<float>& dy, int64_t T) {
  using Ref = moe::detail::RefParams<double>;
  const Ref p = Ref::from(L);
  moe::detail::RefSaved<double> sv;
  const auto xd = convert<double>(x);
  const auto eps = convert<double>(L.routing().eps);
  moe::detail::layer_forward_ref<double>(r.y, sv, xd.data(), p, L.config(), T, true,
                                         eps.empty() ? nullptr : eps.data());
  ASSERT_EQ(L.routing().indices, sv.indices) << "the twin routed otherwise";
  r.grads = Ref::zeros_like(L);
  const auto dyd = convert<double>(dy);
  moe::detail::layer_backward_ref<double>(r.dx, r.grads, dyd.data(), sv, p, L.config());
}

// A layer's forward of x and, with backward, its backward of dy: y, dx and every parameter
// gradient (in parameter_names() order).
struct LayerRun {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;
};
inline LayerRun run_layer(moe::MoELayer& L, const std::vector<float>& x,
                          const std::vector<float>& dy, int64_t T,
                          const moe::ForwardOptions& opt, bool backward = true) {
  LayerRun r;
  r.y.resize(static_cast<size_t>(T * L.config().out_dim()));
  r.dx.resize(x.size());
  L.zero_grad();
  L.forward(r.y.data(), x.data(), T, opt);
  if (!backward) return r;
  L.backward(r.dx.data(), dy.data());
  for (const auto& n : L.parameter_names()) r.grads.push_back(L.grad(n).data);
  return r;
}

// A training forward and backward of the layer cfg (random weights and operands from seed)
// against the float64 twin on the same rounded operands: forward ≤ 1e-3, dx and every
// gradient ≤ 5e-3 of the tensor's largest entry. The worst errors are kept. Returns the run.
inline LayerRun check_rounded_oracle(const moe::MoEConfig& cfg, int64_t T, uint64_t seed,
                                     double& worst_y, double& worst_g) {
  moe::MoELayer L(cfg);
  Rng rng(seed);
  randomize(L, rng);
  const auto x = rng.vec(T * cfg.d_model, 1.0);
  const auto dy = rng.vec(T * cfg.out_dim(), 1.0);
  moe::ForwardOptions opt;
  opt.step = 2;
  const LayerRun f = run_layer(L, x, dy, T, opt);
  RefRun r;
  run_reference(r, L, x, dy, T);
  if (::testing::Test::HasFatalFailure()) return f;
  const double ey = rel_max_err(f.y, r.y);
  EXPECT_LE(ey, 1e-3) << "y";
  worst_y = std::max(worst_y, ey);
  EXPECT_LE(rel_max_err(f.dx, r.dx), 5e-3) << "dx";
  const auto names = L.parameter_names();
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& want = r.grads.get(names[i]);
    if (std::all_of(want.begin(), want.end(), [](double v) { return v == 0.0; })) continue;
    const double eg = rel_max_err(f.grads[i], want);
    EXPECT_LE(eg, 5e-3) << "d" << names[i];
    worst_g = std::max(worst_g, eg);
  }
  return f;
}

// Central differences, step h, of an objective over every entry of v, each against the
// analytic gradient an[i] within atol + rtol·|fd|. eval(saved) evaluates the objective at the
// current v (filling that step's saved state); same(saved) says whether the step left every
// routing decision as it was (a step across a kink makes the difference meaningless, so it
// fails the check). Returns how many entries had |fd| > signal (for the zero-trust checks),
// or -1 when the sizes differ or a step changed a decision.
template <typename Saved, typename Grad, typename Eval, typename Same>
int64_t central_differences(std::vector<double>& v, const std::vector<Grad>& an,
                            const std::string& what, Eval eval, Same same, double atol,
                            double rtol, double signal, double h = 1e-6) {
  EXPECT_EQ(v.size(), an.size()) << what;
  if (v.size() != an.size()) return -1;
  int64_t nonzero = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    const double keep = v[i];
    Saved s1, s2;
    v[i] = keep + h;
    const double lp = eval(s1);
    v[i] = keep - h;
    const double lm = eval(s2);
    v[i] = keep;
    if (!same(s1) || !same(s2)) {
      ADD_FAILURE() << what << "[" << i << "]: the step changed the routing";
      return -1;
    }
    const double fd = (lp - lm) / (2 * h);
    EXPECT_NEAR(double(an[i]), fd, atol + rtol * std::abs(fd)) << what << "[" << i << "]";
    nonzero += std::abs(fd) > signal;
  }
  return nonzero;
}

// The layer's configuration matrix used by the random tests.
struct Case {
  moe::ExpertKind kind;
  moe::Activation act;
  int64_t k;
  std::optional<double> cf;
  moe::DropPolicy policy;
  bool residual;
  moe::Noise noise;
  moe::NoiseScale scale;
  std::string name() const {
    std::string s = std::string(moe::to_string(kind)) + "_" + moe::to_string(act) + "_k" +
                    std::to_string(k) + "_cf" + (cf ? std::to_string(*cf) : "none") + "_" +
                    moe::to_string(policy) + (residual ? "_res" : "") + "_" +
                    moe::to_string(noise) + "_" + moe::to_string(scale);
    return s;
  }
};

inline std::vector<Case> all_cases() {
  using namespace moe;
  std::vector<Case> cases;
  const std::pair<ExpertKind, Activation> kinds[] = {
      {ExpertKind::linear_relu, Activation::relu}, {ExpertKind::mlp, Activation::relu},
      {ExpertKind::mlp, Activation::gelu},         {ExpertKind::mlp, Activation::silu},
      {ExpertKind::swiglu, Activation::relu}};
  const std::pair<std::optional<double>, DropPolicy> caps[] = {
      {std::nullopt, DropPolicy::position},
      {1.0, DropPolicy::position},
      {0.75, DropPolicy::probs},
      {1.25, DropPolicy::probs}};
  const std::pair<Noise, NoiseScale> noises[] = {{Noise::none, NoiseScale::softplus},
                                                 {Noise::fixed, NoiseScale::softplus},
                                                 {Noise::learned, NoiseScale::softplus},
                                                 {Noise::learned, NoiseScale::linear}};
  int i = 0;
  for (auto [kind, act] : kinds)
    for (int64_t k = 1; k <= 3; ++k)
      for (auto [cf, pol] : caps)
        for (int res = 0; res < 2; ++res) {
          // Every noise mode for every other combination keeps the matrix small but complete.
          auto [noise, scale] = noises[(i++) % 4];
          cases.push_back(Case{kind, act, k, cf, pol, res == 1, noise, scale});
        }
  return cases;
}

inline moe::MoEConfig config_of(const Case& c, int64_t d, int64_t E, int64_t F, int64_t Do,
                                uint64_t seed) {
  moe::MoEConfig cfg;
  cfg.d_model = d;
  cfg.n_experts = E;
  cfg.k = c.k;
  cfg.expert = c.kind;
  cfg.activation = c.act;
  cfg.d_ff = F;
  cfg.d_out = c.residual ? d : Do;
  cfg.capacity_factor = c.cf;
  cfg.drop_policy = c.policy;
  cfg.noise = c.noise;
  cfg.noise_scale = c.scale;
  cfg.noise_stddev = 0.7f;
  cfg.aux_alpha = 0.05f;
  cfg.z_alpha = 0.01f;
  cfg.residual = c.residual;
  cfg.router_bias = true;
  cfg.router_init_std = 1.0f;
  cfg.seed = seed;
  return cfg;
}

}  // namespace moe_test
