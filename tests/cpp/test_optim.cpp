// Optimizers against hand-computed steps, Adam's closed form, PyTorch's trajectories on a
// quadratic, state save/restore, and gradient-norm clipping.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "moe/checkpoint.hpp"
#include "moe/optim.hpp"
#include "test_checkpoint_util.hpp"

namespace {

using moe::ParamRef;
using moe::Tensor;
using moe_test::throws_error_with;

Tensor vec(std::vector<float> v) {
  Tensor t({static_cast<int64_t>(v.size())});
  t.data = std::move(v);
  return t;
}

// f(p) = ½·Σ a_i (p_i − c_i)², from p = (1, −2, 0.5): the same problem the PyTorch
// references below were computed on (torch 1.13, float64, 5 steps).
struct Quadratic {
  std::vector<double> a = {1.0, 3.0, 0.5}, c = {0.3, 0.1, -1.0};
  Tensor p = vec({1.0f, -2.0f, 0.5f});
  Tensor g = Tensor({3});
  std::vector<ParamRef> refs() { return {{"p", &p, &g}}; }
  void grad() {
    for (size_t i = 0; i < 3; ++i) g.data[i] = static_cast<float>(a[i] * (p.data[i] - c[i]));
  }
  void run(moe::Optimizer& opt, int steps) {
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      grad();
      opt.step();
    }
  }
};

void expect_near(const Tensor& t, const std::vector<double>& want, double tol) {
  ASSERT_EQ(t.data.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(t.data[i], want[i], tol) << i;
}

}  // namespace

TEST(OptimSGD, PlainStep) {
  Tensor p = vec({1.0f, 2.0f}), g = vec({0.5f, -1.0f});
  moe::SGDConfig cfg;
  cfg.lr = 0.1;
  moe::SGD opt({{"p", &p, &g}}, cfg);
  opt.step();
  expect_near(p, {0.95, 2.1}, 1e-7);
  EXPECT_EQ(opt.step_count(), 1);
  EXPECT_TRUE(opt.state_tensors().empty());  // no momentum, no state
}

TEST(OptimSGD, MomentumDampeningNesterovByHand) {
  // Gradients 1 then 2, lr 0.1, from p = 1.
  auto two_steps = [](moe::SGDConfig cfg) {
    Tensor p = vec({1.0f}), g = vec({1.0f});
    moe::SGD opt({{"p", &p, &g}}, cfg);
    opt.step();
    g.data[0] = 2.0f;
    opt.step();
    return static_cast<double>(p.data[0]);
  };
  moe::SGDConfig m;
  m.lr = 0.1;
  m.momentum = 0.9;
  // b1 = 1, p = 0.9; b2 = 0.9·1 + 2 = 2.9, p = 0.9 − 0.29.
  EXPECT_NEAR(two_steps(m), 0.61, 1e-6);
  moe::SGDConfig d = m;
  d.dampening = 0.5;
  // b1 = 1 (the first step is not dampened), b2 = 0.9 + 0.5·2 = 1.9.
  EXPECT_NEAR(two_steps(d), 0.71, 1e-6);
  moe::SGDConfig n = m;
  n.nesterov = true;
  // step 1: b = 1, d = 1 + 0.9 = 1.9, p = 0.81; step 2: b = 2.9, d = 2 + 2.61, p = 0.349.
  EXPECT_NEAR(two_steps(n), 0.349, 1e-6);
}

TEST(OptimSGD, WeightDecayAddsToTheGradient) {
  Tensor p = vec({1.0f}), g = vec({0.0f});
  moe::SGDConfig cfg;
  cfg.lr = 0.5;
  cfg.weight_decay = 0.1;
  moe::SGD opt({{"p", &p, &g}}, cfg);
  opt.step();
  EXPECT_NEAR(p.data[0], 0.95, 1e-7);
}

TEST(OptimSGD, MatchesPyTorchOnAQuadratic) {
  {
    Quadratic q;
    moe::SGDConfig cfg;
    cfg.lr = 0.05;
    cfg.momentum = 0.9;
    cfg.nesterov = true;
    cfg.weight_decay = 0.01;
    moe::SGD opt(q.refs(), cfg);
    q.run(opt, 5);
    expect_near(q.p, {0.5153411061733651, 0.7946997773906955, -0.07213701634477844}, 2e-6);
  }
  {
    Quadratic q;
    moe::SGDConfig cfg;
    cfg.lr = 0.05;
    cfg.momentum = 0.8;
    cfg.dampening = 0.3;
    moe::SGD opt(q.refs(), cfg);
    q.run(opt, 5);
    expect_near(q.p, {0.709629332415625, 0.15682840863437536, 0.17413669044775393}, 2e-6);
  }
}

TEST(OptimAdam, ConstantGradientMovesLrPerStep) {
  // Closed form: with a constant gradient g, m_t = (1−β1^t)·g and v_t = (1−β2^t)·g², so the
  // bias-corrected step is exactly lr·g/(|g| + eps) on every step.
  Tensor p = vec({0.0f, 0.0f, 0.0f}), g = vec({2.0f, -0.25f, 1e-3f});
  moe::AdamConfig cfg;
  cfg.lr = 0.01;
  cfg.eps = 1e-8;
  moe::Adam opt({{"p", &p, &g}}, cfg);
  for (int t = 1; t <= 20; ++t) {
    opt.step();
    for (size_t i = 0; i < 3; ++i) {
      const double gi = g.data[i];
      EXPECT_NEAR(p.data[i], -t * cfg.lr * gi / (std::fabs(gi) + cfg.eps), 1e-5) << t << " " << i;
    }
  }
}

TEST(OptimAdam, MatchesPyTorchOnAQuadratic) {
  Quadratic q;
  moe::AdamConfig cfg;
  cfg.lr = 0.1;
  moe::Adam opt(q.refs(), cfg);
  EXPECT_STREQ(opt.kind(), "adam");
  q.run(opt, 5);
  expect_near(q.p, {0.5145516461035899, -1.5027745542480317, 0.004358174697101716}, 2e-6);
}

TEST(OptimAdam, L2WeightDecayMatchesPyTorch) {
  Quadratic q;
  moe::AdamConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.1;
  moe::Adam opt(q.refs(), cfg);
  q.run(opt, 5);
  expect_near(q.p, {0.5135885023238452, -1.5027800625128838, 0.005153370265808449}, 2e-6);
}

TEST(OptimAdamW, DecoupledWeightDecayMatchesPyTorch) {
  Quadratic q;
  moe::Adam opt(q.refs(), moe::adamw_config(0.1, 0.1));
  EXPECT_STREQ(opt.kind(), "adamw");
  q.run(opt, 5);
  expect_near(q.p, {0.47779481086956954, -1.4153313131334309, -0.010042724054482088}, 2e-6);
}

TEST(OptimAdamW, ZeroGradientOnlyShrinks) {
  // With g = 0 the Adam part is 0/(0 + eps) = 0: AdamW multiplies by (1 − lr·wd) per step,
  // whereas Adam's L2 term becomes a gradient and moves p by about lr.
  Tensor p = vec({2.0f}), g = vec({0.0f});
  moe::Adam w({{"p", &p, &g}}, moe::adamw_config(0.1, 0.5));
  w.step();
  w.step();
  EXPECT_NEAR(p.data[0], 2.0 * 0.95 * 0.95, 1e-6);

  Tensor p2 = vec({2.0f}), g2 = vec({0.0f});
  moe::AdamConfig l2;
  l2.lr = 0.1;
  l2.weight_decay = 0.5;
  moe::Adam a({{"p", &p2, &g2}}, l2);
  a.step();
  EXPECT_NEAR(p2.data[0], 2.0 - 0.1, 1e-6);
}

TEST(Optim, ConfigsAreValidatedNamingTheField) {
  moe::SGDConfig s;
  s.lr = -1;
  EXPECT_TRUE(throws_error_with([&] { s.validate(); }, "sgd lr"));
  s = {};
  s.nesterov = true;
  EXPECT_TRUE(throws_error_with([&] { s.validate(); }, "sgd nesterov"));
  s = {};
  s.dampening = 2;
  EXPECT_TRUE(throws_error_with([&] { s.validate(); }, "sgd dampening"));
  s = {};
  s.momentum = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(throws_error_with([&] { s.validate(); }, "sgd momentum"));
  moe::AdamConfig a;
  a.beta1 = 1.0;
  EXPECT_TRUE(throws_error_with([&] { a.validate(); }, "adam beta1"));
  a = {};
  a.beta2 = -0.1;
  EXPECT_TRUE(throws_error_with([&] { a.validate(); }, "adam beta2"));
  a = moe::adamw_config();
  a.eps = 0;
  EXPECT_TRUE(throws_error_with([&] { a.validate(); }, "adamw eps"));
  a = {};
  a.weight_decay = -1;
  EXPECT_TRUE(throws_error_with([&] { a.validate(); }, "adam weight_decay"));

  Tensor p = vec({1.0f}), g = vec({1.0f});
  moe::Adam opt({{"p", &p, &g}}, moe::AdamConfig{});
  EXPECT_TRUE(throws_error_with([&] { opt.set_lr(-0.5); }, "adam lr"));
  EXPECT_DOUBLE_EQ(opt.lr(), 1e-3);
  opt.set_lr(0.5);
  EXPECT_DOUBLE_EQ(opt.lr(), 0.5);
  // The constructor validates too.
  moe::SGDConfig bad;
  bad.lr = std::numeric_limits<double>::infinity();
  EXPECT_THROW(moe::SGD({{"p", &p, &g}}, bad), moe::Error);
}

TEST(Optim, ParameterListIsValidated) {
  Tensor p = vec({1.0f, 2.0f}), g = vec({1.0f, 2.0f}), g3 = vec({1, 2, 3}), q = vec({0.0f, 0.0f});
  const moe::AdamConfig cfg;
  EXPECT_TRUE(throws_error_with([&] { moe::Adam({{"p", &p, &g3}}, cfg); }, "'p' has shape [2]"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::Adam({{"p", &p, &g}, {"p", &q, &g3}}, cfg);
      },
      "listed twice"));
  EXPECT_TRUE(throws_error_with([&] { moe::Adam({{"p", &p, nullptr}}, cfg); }, "null"));
  EXPECT_TRUE(throws_error_with([&] { moe::Adam({{"", &p, &g}}, cfg); }, "empty name"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::Adam({{"a", &p, &g}, {"b", &p, &q}}, cfg);
      },
      "shares a tensor"));
}

TEST(Optim, StepRefusesAParameterThatChangedSize) {
  Tensor p = vec({1.0f, 2.0f}), g = vec({1.0f, 2.0f});
  moe::Adam opt({{"p", &p, &g}}, moe::AdamConfig{});
  p = vec({1.0f, 2.0f, 3.0f});
  g = vec({1.0f, 2.0f, 3.0f});
  EXPECT_TRUE(throws_error_with([&] { opt.step(); }, "changed size"));
}

TEST(Optim, ZeroGradClearsEveryGradient) {
  Tensor p = vec({1.0f}), g = vec({3.0f}), p2 = vec({1.0f, 1.0f}), g2 = vec({4.0f, 5.0f});
  moe::SGD opt({{"a", &p, &g}, {"b", &p2, &g2}}, moe::SGDConfig{});
  opt.zero_grad();
  EXPECT_EQ(g.data, std::vector<float>{0.0f});
  EXPECT_EQ(g2.data, (std::vector<float>{0.0f, 0.0f}));
}

TEST(OptimState, SaveAndResumeGivesIdenticalBits) {
  moe_test::ScratchDir dir;
  const std::string path = dir.file("state.safetensors");
  for (int kind = 0; kind < 3; ++kind) {
    auto make = [&](Quadratic& q) -> std::unique_ptr<moe::Optimizer> {
      if (kind == 0) {
        moe::SGDConfig c;
        c.momentum = 0.9;
        return std::make_unique<moe::SGD>(q.refs(), c);
      }
      if (kind == 1) return std::make_unique<moe::Adam>(q.refs(), moe::AdamConfig{});
      return std::make_unique<moe::Adam>(q.refs(), moe::adamw_config(0.01, 0.1));
    };
    Quadratic straight, resumed;
    auto o1 = make(straight);
    straight.run(*o1, 3);

    // Save after 3 steps, then continue both ways.
    auto tensors = o1->state_tensors();
    tensors.emplace_back("p", &straight.p);
    moe::save_safetensors(path, tensors, {o1->state_metadata()});
    straight.run(*o1, 4);

    const auto file = moe::load_safetensors(path);
    resumed.p = file.find("p")->tensor;
    auto o2 = make(resumed);
    o2->load_state(file);
    EXPECT_EQ(o2->step_count(), 3);
    resumed.run(*o2, 4);
    for (size_t i = 0; i < 3; ++i)
      EXPECT_EQ(std::bit_cast<uint32_t>(straight.p.data[i]),
                std::bit_cast<uint32_t>(resumed.p.data[i]))
          << "kind " << kind << " entry " << i;
  }
}

TEST(OptimState, NamesFollowTheCheckpointConvention) {
  Tensor p = vec({1.0f}), g = vec({1.0f}), p2 = vec({1.0f}), g2 = vec({1.0f});
  moe::Adam opt({{"W1", &p, &g}, {"head.W", &p2, &g2}}, moe::AdamConfig{});
  std::vector<std::string> names;
  for (const auto& [n, t] : opt.state_tensors()) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"optim.m.W1", "optim.m.head.W", "optim.v.W1",
                                             "optim.v.head.W"}));
  EXPECT_EQ(opt.state_metadata().first, "optim");
}

TEST(OptimState, LoadRefusesMismatchesAndChangesNothing) {
  moe_test::ScratchDir dir;
  Tensor p = vec({1.0f, 2.0f}), g = vec({0.5f, 0.5f});
  moe::Adam src({{"p", &p, &g}}, moe::AdamConfig{});
  src.step();
  const std::string path = dir.file("s.safetensors");
  moe::save_safetensors(path, src.state_tensors(), {src.state_metadata()});
  const auto file = moe::load_safetensors(path);

  // Wrong kind.
  Tensor q = vec({0.0f, 0.0f}), gq = vec({0.0f, 0.0f});
  moe::SGDConfig sc;
  sc.momentum = 0.5;
  moe::SGD sgd({{"p", &q, &gq}}, sc);
  EXPECT_TRUE(throws_error_with([&] { sgd.load_state(file); }, "holds 'adam' state"));
  // Wrong shape.
  Tensor r = vec({0.0f, 0.0f, 0.0f}), gr = vec({0.0f, 0.0f, 0.0f});
  moe::Adam wrong_shape({{"p", &r, &gr}}, moe::AdamConfig{});
  EXPECT_TRUE(throws_error_with([&] { wrong_shape.load_state(file); },
                                "'optim.m.p' has shape [2], expected [3]"));
  EXPECT_EQ(wrong_shape.step_count(), 0);
  // Missing tensor.
  moe::Adam other_name({{"x", &q, &gq}}, moe::AdamConfig{});
  EXPECT_TRUE(throws_error_with([&] { other_name.load_state(file); }, "'optim.m.x' is missing"));
  // No metadata.
  moe::SafetensorsFile bare = file;
  bare.metadata.clear();
  moe::Adam fresh({{"p", &q, &gq}}, moe::AdamConfig{});
  EXPECT_TRUE(throws_error_with([&] { fresh.load_state(bare); }, "no __metadata__ entry 'optim'"));
  bare.metadata["optim"] = "{not json";
  EXPECT_TRUE(throws_error_with([&] { fresh.load_state(bare); }, "not valid JSON"));
  EXPECT_EQ(fresh.step_count(), 0);
}

TEST(ClipGradNorm, ScalesToMaxNormAndReturnsTheNormBefore) {
  Tensor a = vec({3.0f, 4.0f}), b = vec({12.0f});  // ‖·‖ = 13
  const double norm = moe::clip_grad_norm(std::vector<Tensor*>{&a, &b}, 6.5);
  EXPECT_DOUBLE_EQ(norm, 13.0);
  const double s = 6.5 / (13.0 + 1e-6);
  expect_near(a, {3.0 * s, 4.0 * s}, 1e-6);
  expect_near(b, {12.0 * s}, 1e-6);
  // The global norm after clipping is max_norm (up to the 1e-6 guard).
  const double after =
      std::sqrt(a.data[0] * a.data[0] + a.data[1] * a.data[1] + b.data[0] * b.data[0]);
  EXPECT_NEAR(after, 6.5, 1e-5);
}

TEST(ClipGradNorm, LeavesSmallGradientsAlone) {
  Tensor a = vec({3.0f, 4.0f});
  EXPECT_DOUBLE_EQ(moe::clip_grad_norm(std::vector<Tensor*>{&a}, 5.0 + 1e-3), 5.0);
  EXPECT_EQ(a.data, (std::vector<float>{3.0f, 4.0f}));
  EXPECT_DOUBLE_EQ(moe::clip_grad_norm(std::vector<Tensor*>{}, 1.0), 0.0);
}

TEST(ClipGradNorm, NormIsAccumulatedInDouble) {
  // 2^24 + 1 ones: a float accumulator stalls at 2^24 and reports sqrt(2^24) = 4096.
  Tensor a({(1 << 24) + 1}, 1.0f);
  EXPECT_DOUBLE_EQ(moe::clip_grad_norm(std::vector<Tensor*>{&a}, 1e9), std::sqrt(16777217.0));
}

TEST(ClipGradNorm, NonFiniteNormIsReturnedAndNothingScaled) {
  Tensor a = vec({1.0f, std::numeric_limits<float>::infinity()}), b = vec({2.0f});
  EXPECT_TRUE(std::isinf(moe::clip_grad_norm(std::vector<Tensor*>{&a, &b}, 1.0)));
  EXPECT_EQ(b.data, std::vector<float>{2.0f});
  Tensor n = vec({std::numeric_limits<float>::quiet_NaN()});
  EXPECT_TRUE(std::isnan(moe::clip_grad_norm(std::vector<Tensor*>{&n, &b}, 1.0)));
  EXPECT_EQ(b.data, std::vector<float>{2.0f});
}

TEST(ClipGradNorm, ValidatesArguments) {
  Tensor a = vec({1.0f});
  EXPECT_TRUE(
      throws_error_with([&] { moe::clip_grad_norm(std::vector<Tensor*>{&a}, 0.0); }, "max_norm"));
  EXPECT_TRUE(
      throws_error_with([&] { moe::clip_grad_norm(std::vector<Tensor*>{&a}, -1.0); }, "max_norm"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::clip_grad_norm(std::vector<Tensor*>{&a, nullptr}, 1.0);
      },
      "null"));
  Tensor p = vec({1.0f});
  std::vector<ParamRef> refs = {{"p", &p, &a}};
  EXPECT_DOUBLE_EQ(moe::clip_grad_norm(refs, 10.0), 1.0);
}
