// A layer without fp32 masters (LayerOptions{masters = false}, what from_pretrained builds):
// expert matrices written through set_expert_matrix straight into the bf16 copies give the
// same forward as a layer with masters holding the same values; drop_masters() turns a layer
// into one; training, backward and the dropped names are errors naming the field. Also the
// decoders of the pretrained loader's quantised formats against their definitions.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "io/pretrained_folder.hpp"
#include "moe/checkpoint.hpp"
#include "moe/layer.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::LayerOptions;
using moe::MoEConfig;
using moe::MoELayer;
using moe_test::eval_forward;

MoEConfig swiglu_cfg(int64_t shared) {
  MoEConfig c;
  c.d_model = 12;
  c.n_experts = 4;
  c.k = 2;
  c.d_ff = 10;
  c.expert = moe::ExpertKind::swiglu;
  c.expert_bias = false;
  c.noise = moe::Noise::none;
  c.aux_alpha = 0.0f;
  c.router_kind = moe::RouterKind::softmax_topk;
  c.renormalize = true;
  c.n_shared_experts = shared;
  c.shared_gate = shared > 0;
  c.precision = moe::Precision::bf16;
  c.seed = 3;
  return c;
}

std::vector<float> random_vec(size_t n, uint64_t seed) {
  moe_test::Rng r(seed);
  return r.vec(static_cast<int64_t>(n), 1.0);
}

// Copies every expert matrix of `from` (with masters) into `to` through set_expert_matrix, and
// the other parameters through param().
void copy_into(MoELayer& to, const MoELayer& from) {
  for (const std::string& n : from.parameter_names()) {
    const moe::Tensor& t = from.param(n);
    if (n == "W1" || n == "W2" || n == "W3" || n == "Ws1" || n == "Ws2" || n == "Ws3") {
      const int64_t per = t.shape[1] * t.shape[2];
      for (int64_t e = 0; e < t.shape[0]; ++e) to.set_expert_matrix(n, e, t.ptr() + e * per);
    } else {
      to.param(n).data = t.data;
    }
  }
}

TEST(LayerMasters, HeldOnlyEqualsMasters) {
  for (int64_t shared : {0, 1}) {
    const MoEConfig c = swiglu_cfg(shared);
    MoELayer full(c);
    moe_test::Rng rng(7);
    moe_test::randomize(full, rng);
    LayerOptions o;
    o.masters = false;
    MoELayer lean(c, o);
    EXPECT_TRUE(full.holds_masters());
    EXPECT_FALSE(lean.holds_masters());
    for (const auto& n : lean.parameter_names())
      EXPECT_TRUE(n != "W1" && n != "W2" && n != "W3" && n != "Ws1") << n;
    copy_into(lean, full);
    const int64_t T = 9;
    const auto x = random_vec(static_cast<size_t>(T * c.d_model), 11);
    const std::vector<float> y1 = eval_forward(full, x, T), y2 = eval_forward(lean, x, T);
    double scale = 0.0;
    for (float v : y1) scale = std::max(scale, std::abs(static_cast<double>(v)));
    ASSERT_GT(scale, 0.1);
    EXPECT_EQ(y1, y2) << "shared " << shared;  // the same bf16 operands, bit for bit
  }
}

TEST(LayerMasters, DropMastersKeepsTheForward) {
  const MoEConfig c = swiglu_cfg(1);
  MoELayer L(c);
  moe_test::Rng rng(8);
  moe_test::randomize(L, rng);
  const int64_t T = 7;
  const auto x = random_vec(static_cast<size_t>(T * c.d_model), 5);
  const std::vector<float> y1 = eval_forward(L, x, T);
  L.drop_masters();
  EXPECT_FALSE(L.holds_masters());
  L.weights_changed();  // must not throw the copies away
  EXPECT_EQ(eval_forward(L, x, T), y1);
  // A routed matrix written afterwards changes the output.
  std::vector<float> z(static_cast<size_t>(c.d_ff * c.d_model), 0.0f);
  for (int64_t e = 0; e < c.n_experts; ++e) L.set_expert_matrix("W2", e, z.data());
  L.set_expert_matrix("Ws2", 0, z.data());
  for (float v : eval_forward(L, x, T)) EXPECT_EQ(v, 0.0f);
}

// expert_matrix of a layer without masters gives the held bf16 values (the masters rounded),
// and a checkpoint of it holds them: a layer with masters loaded from it runs the same.
TEST(LayerMasters, ExpertMatrixAndCheckpointWithoutMasters) {
  const MoEConfig c = swiglu_cfg(1);
  MoELayer L(c);
  moe_test::Rng rng(9);
  moe_test::randomize(L, rng);
  const moe::Tensor W2 = L.param("W2");
  L.drop_masters();
  const moe::Tensor held = L.expert_matrix("W2");
  ASSERT_EQ(held.shape, W2.shape);
  for (size_t i = 0; i < held.data.size(); ++i)
    ASSERT_EQ(held.data[i], moe::detail::round_bf16(W2.data[i])) << i;
  const std::string path = ::testing::TempDir() + "lean_layer.safetensors";
  moe::save_checkpoint(L, path);
  MoELayer back(moe::read_checkpoint_config(path));
  moe::load_checkpoint(back, path);
  EXPECT_EQ(back.param("W2").data, held.data);
  const int64_t T = 6;
  const auto x = random_vec(static_cast<size_t>(T * c.d_model), 4);
  EXPECT_EQ(eval_forward(back, x, T), eval_forward(L, x, T));
  EXPECT_THROW(L.expert_matrix("b_g"), moe::Error);
}

TEST(LayerMasters, ErrorsNameTheField) {
  const MoEConfig c = swiglu_cfg(0);
  LayerOptions o;
  o.masters = false;
  MoELayer L(c, o);
  std::vector<float> x(2 * c.d_model, 0.5f), y(2 * c.d_model), dx(2 * c.d_model);
  try {
    L.forward(y.data(), x.data(), 2);  // training by default
    FAIL() << "training forward without masters";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("training needs the fp32 masters"), std::string::npos);
  }
  moe::ForwardOptions eval;
  eval.training = false;
  L.forward(y.data(), x.data(), 2, eval);
  EXPECT_THROW(L.backward(dx.data(), y.data()), moe::Error);
  try {
    (void)L.param("W1");
    FAIL() << "W1 without masters";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("W1: not held as an fp32 tensor"), std::string::npos);
  }
  std::vector<float> m(static_cast<size_t>(c.d_model * c.d_ff));
  EXPECT_THROW(L.set_expert_matrix("W1", 4, m.data()), moe::Error);
  EXPECT_THROW(L.set_expert_matrix("W_g", 0, m.data()), moe::Error);
  EXPECT_THROW(L.set_expert_matrix("Ws1", 0, m.data()), moe::Error);  // no shared experts
}

TEST(LayerMasters, Fp32IgnoresTheOption) {
  MoEConfig c = swiglu_cfg(0);
  c.precision = moe::Precision::fp32;
  LayerOptions o;
  o.masters = false;
  MoELayer L(c, o);
  EXPECT_TRUE(L.holds_masters());
  std::vector<float> m(static_cast<size_t>(c.d_model * c.d_ff), 2.0f);
  L.set_expert_matrix("W3", 1, m.data());
  const moe::Tensor& W3 = L.param("W3");
  EXPECT_EQ(W3.data[c.d_model * c.d_ff], 2.0f);
  EXPECT_NE(W3.data[0], 2.0f);
}

// The formats' definitions: e4m3fn = (-1)^s · 2^(e-7) · (1 + m/8), subnormals 2^-6 · m/8,
// S.1111.111 NaN; e2m1 = the eight magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 with a sign bit.
TEST(PretrainedFormats, Fp8E4m3AndFp4E2m1) {
  using moe::detail::fp4_e2m1_to_float;
  using moe::detail::fp8_e4m3_to_float;
  for (int v = 0; v < 256; ++v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    const float got = fp8_e4m3_to_float(static_cast<uint8_t>(v));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(got)) << v;
      continue;
    }
    double want = e == 0 ? std::pow(2.0, -6) * m / 8.0 : std::pow(2.0, e - 7) * (1.0 + m / 8.0);
    if (s) want = -want;
    EXPECT_EQ(static_cast<double>(got), want) << v;
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);  // the largest finite value
  const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int n = 0; n < 16; ++n)
    EXPECT_EQ(fp4_e2m1_to_float(static_cast<uint8_t>(n)), (n & 8 ? -1.0f : 1.0f) * mags[n & 7]);
}

}  // namespace
