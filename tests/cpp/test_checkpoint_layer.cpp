// Layer checkpoints: round trips for every expert kind, refusal of files that do not fit the
// layer (naming tensor, expected and found), extras and optimizer state, config JSON.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>

#include "moe/checkpoint.hpp"
#include "moe/layer.hpp"
#include "moe/optim.hpp"
#include "test_checkpoint_util.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::MoEConfig;
using moe::MoELayer;
using moe::Tensor;
using moe_test::ScratchDir;
using moe_test::eval_forward;
using moe_test::throws_error_with;

MoEConfig small_config(moe::ExpertKind kind, uint64_t seed) {
  MoEConfig c;
  c.d_model = 6;
  c.n_experts = 4;
  c.k = 2;
  c.expert = kind;
  c.d_ff = 5;
  c.router_bias = true;
  c.router_init_std = 0.5f;  // non-zero router weights, so that loading them matters
  c.noise = moe::Noise::learned;
  c.seed = seed;
  return c;
}

void fill(MoELayer& layer, uint32_t seed) {
  uint32_t s = seed * 2654435761u + 1;
  for (const auto& n : layer.parameter_names())
    for (float& v : layer.param(n).data) {
      s = s * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(s >> 8) % 2001 - 1000) / 1000.0f;
    }
}

void expect_same_params(const MoELayer& a, const MoELayer& b) {
  ASSERT_EQ(a.parameter_names(), b.parameter_names());
  for (const auto& n : a.parameter_names()) {
    const Tensor& x = a.param(n);
    const Tensor& y = b.param(n);
    ASSERT_EQ(x.shape, y.shape) << n;
    ASSERT_EQ(x.data.size(), y.data.size()) << n;
    EXPECT_EQ(0, std::memcmp(x.data.data(), y.data.data(), x.data.size() * sizeof(float))) << n;
  }
}

}  // namespace

TEST(LayerCheckpoint, RoundTripEveryExpertKind) {
  ScratchDir dir;
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu}) {
    MoELayer a(small_config(kind, 1));
    fill(a, 7);
    const std::string path = dir.file(std::string(moe::to_string(kind)) + ".safetensors");
    moe::save_checkpoint(a, path, {{"note", "hello"}});

    MoELayer b(small_config(kind, 2));
    fill(b, 8);
    const auto file = moe::load_checkpoint(b, path);
    expect_same_params(a, b);
    EXPECT_EQ(file.metadata.at("note"), "hello");
    EXPECT_EQ(file.metadata.at("moe_config"), moe::config_to_json(a.config()));

    // The tensors are stored under the layer's own names, in its order.
    std::vector<std::string> names;
    for (const auto& t : file.tensors) names.push_back(t.name);
    EXPECT_EQ(names, a.parameter_names());

    std::vector<float> x(5 * 6);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.7f * static_cast<float>(i));
    const auto ya = eval_forward(a, x, 5), yb = eval_forward(b, x, 5);
    EXPECT_EQ(ya, yb) << moe::to_string(kind);
    EXPECT_NE(ya, std::vector<float>(ya.size(), 0.0f));
  }
}

TEST(LayerCheckpoint, ReadCheckpointConfigRebuildsTheLayer) {
  ScratchDir dir;
  MoEConfig c = small_config(moe::ExpertKind::mlp, 3);
  c.capacity_factor = 1.25;
  c.activation = moe::Activation::gelu;
  c.drop_policy = moe::DropPolicy::probs;
  MoELayer a(c);
  moe::save_checkpoint(a, dir.file("c.safetensors"));
  const MoEConfig r = moe::read_checkpoint_config(dir.file("c.safetensors"));
  EXPECT_EQ(moe::config_to_json(r), moe::config_to_json(c));
  MoELayer b(r);
  moe::load_checkpoint(b, dir.file("c.safetensors"));
  expect_same_params(a, b);
}

TEST(LayerCheckpoint, WrongShapeNamesTensorExpectedAndFound) {
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::mlp, 1));
  moe::save_checkpoint(a, dir.file("a.safetensors"));
  MoEConfig wider = small_config(moe::ExpertKind::mlp, 2);
  wider.d_ff = 7;
  MoELayer b(wider);
  fill(b, 3);
  const Tensor before = b.param("W_g");
  EXPECT_TRUE(throws_error_with([&] { moe::load_checkpoint(b, dir.file("a.safetensors")); },
                                "tensor 'W1' has shape [4, 6, 5] in the file, but the layer "
                                "expects [4, 6, 7]"));
  // W_g fits, but nothing was loaded: the file is refused as a whole.
  EXPECT_EQ(b.param("W_g").data, before.data);
}

TEST(LayerCheckpoint, MissingTensorIsNamed) {
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::mlp, 1));
  std::vector<std::pair<std::string, const Tensor*>> most;
  for (const auto& n : a.parameter_names())
    if (n != "b2") most.emplace_back(n, &a.param(n));
  moe::save_safetensors(dir.file("m.safetensors"), most);
  EXPECT_TRUE(throws_error_with([&] { moe::load_checkpoint(a, dir.file("m.safetensors")); },
                                "tensor 'b2' is missing"));
}

TEST(LayerCheckpoint, WrongDtypeIsRefused) {
  // The same layer written by hand with W_g as F64: readable as safetensors, but not an exact
  // checkpoint of a float32 layer.
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::linear_relu, 1));
  std::string header = "{";
  std::vector<uint8_t> data;
  for (const auto& n : a.parameter_names()) {
    const Tensor& t = a.param(n);
    const bool f64 = n == "W_g";
    const size_t begin = data.size();
    for (float v : t.data) {
      if (f64) {
        const double d = v;
        const auto* b = reinterpret_cast<const uint8_t*>(&d);
        data.insert(data.end(), b, b + 8);
      } else {
        const auto* b = reinterpret_cast<const uint8_t*>(&v);
        data.insert(data.end(), b, b + 4);
      }
    }
    if (header.size() > 1) header += ",";
    header += "\"" + n + "\":{\"dtype\":\"";
    header += f64 ? "F64" : "F32";
    header += "\",\"shape\":" + moe::shape_str(t.shape);
    header += ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(data.size());
    header += "]}";
  }
  header += "}";
  moe_test::write_bytes(dir.file("d.safetensors"), moe_test::st_bytes(header, data));
  // Readable as a file (F64 is converted) ...
  EXPECT_EQ(moe::load_safetensors(dir.file("d.safetensors")).find("W_g")->dtype, "F64");
  // ... but refused as this layer's checkpoint.
  EXPECT_TRUE(throws_error_with([&] { moe::load_checkpoint(a, dir.file("d.safetensors")); },
                                "tensor 'W_g' has dtype F64, expected F32"));
}

TEST(LayerCheckpoint, CorruptFileErrorNamesThePath) {
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::mlp, 1));
  moe::save_checkpoint(a, dir.file("a.safetensors"));
  auto bytes = moe_test::read_bytes(dir.file("a.safetensors"));
  bytes.resize(bytes.size() - 3);
  moe_test::write_bytes(dir.file("a.safetensors"), bytes);
  EXPECT_TRUE(throws_error_with([&] { moe::load_checkpoint(a, dir.file("a.safetensors")); },
                                dir.file("a.safetensors")));
}

TEST(LayerCheckpoint, ExtrasAndOptimizerStateResumeTrainingBitForBit) {
  ScratchDir dir;
  const std::string path = dir.file("train.safetensors");
  const int64_t T = 8;
  std::vector<float> x(static_cast<size_t>(T * 6)), dy(static_cast<size_t>(T * 6));
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::cos(0.37f * static_cast<float>(i));
    dy[i] = std::sin(0.11f * static_cast<float>(i));
  }
  struct Run {
    MoELayer layer;
    Tensor head, dhead;
    std::vector<moe::ParamRef> refs;
    std::unique_ptr<moe::Adam> opt;
    explicit Run(const MoEConfig& c) : layer(c), head({3}, 0.5f), dhead({3}) {
      refs = moe::layer_params(layer);
      refs.push_back({"head.W", &head, &dhead});
      opt = std::make_unique<moe::Adam>(refs, moe::adamw_config(0.01, 0.01));
    }
    void step(const std::vector<float>& x, const std::vector<float>& dy, uint64_t s) {
      opt->zero_grad();
      std::vector<float> y(x.size()), dx(x.size());
      moe::ForwardOptions fo;
      fo.step = s;
      layer.forward(y.data(), x.data(), 8, fo);
      layer.backward(dx.data(), dy.data());
      for (size_t i = 0; i < 3; ++i) dhead.data[i] = y[i];
      moe::clip_grad_norm(refs, 1.0);
      opt->step();
    }
  };
  const MoEConfig c = small_config(moe::ExpertKind::swiglu, 5);
  Run straight(c);
  for (uint64_t s = 0; s < 3; ++s) straight.step(x, dy, s);
  moe::CheckpointExtras ex;
  ex.tensors = {{"head.W", &straight.head}};
  ex.optimizer = straight.opt.get();
  ex.metadata = {{"step", "3"}};
  moe::save_checkpoint(straight.layer, path, ex);
  for (uint64_t s = 3; s < 6; ++s) straight.step(x, dy, s);

  // The same config (its seed also keys the router noise), but different weights and state.
  Run resumed(c);
  fill(resumed.layer, 42);
  resumed.head.data = {9.0f, 9.0f, 9.0f};
  const auto file = moe::load_checkpoint(resumed.layer, path, resumed.opt.get());
  resumed.head = file.find("head.W")->tensor;
  EXPECT_EQ(resumed.opt->step_count(), 3);
  EXPECT_EQ(file.metadata.at("step"), "3");
  EXPECT_NE(file.find("optim.m.W1"), nullptr);
  EXPECT_NE(file.find("optim.v.head.W"), nullptr);
  for (uint64_t s = 3; s < 6; ++s) resumed.step(x, dy, s);
  expect_same_params(straight.layer, resumed.layer);
  EXPECT_EQ(straight.head.data, resumed.head.data);
}

TEST(LayerCheckpoint, OptimizerMismatchLeavesLayerUntouched) {
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::mlp, 1));
  fill(a, 1);
  moe::save_checkpoint(a, dir.file("noopt.safetensors"));  // no optimizer state in it
  MoELayer b(small_config(moe::ExpertKind::mlp, 2));
  fill(b, 2);
  const Tensor before = b.param("W1");
  moe::Adam opt(moe::layer_params(b), moe::AdamConfig{});
  EXPECT_TRUE(throws_error_with(
      [&] { moe::load_checkpoint(b, dir.file("noopt.safetensors"), &opt); }, "'optim'"));
  EXPECT_EQ(b.param("W1").data, before.data);
}

TEST(LayerCheckpoint, ReservedMetadataAndNameClashesAreRefused) {
  ScratchDir dir;
  MoELayer a(small_config(moe::ExpertKind::mlp, 1));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_checkpoint(a, dir.file("r.safetensors"), {{"moe_config", "{}"}});
      },
      "reserved"));
  moe::CheckpointExtras ex;
  Tensor t({1});
  ex.tensors = {{"W1", &t}};
  EXPECT_TRUE(throws_error_with([&] { moe::save_checkpoint(a, dir.file("r.safetensors"), ex); },
                                "'W1' given twice"));
  EXPECT_TRUE(dir.listing().empty());
}

TEST(ConfigJson, RoundTripsEveryField) {
  MoEConfig c;
  c.d_model = 12;
  c.n_experts = 6;
  c.k = 3;
  c.expert = moe::ExpertKind::swiglu;
  c.d_ff = 20;
  c.d_out = 12;
  c.activation = moe::Activation::silu;
  c.expert_bias = false;
  c.capacity_factor = 1.5;
  c.drop_policy = moe::DropPolicy::probs;
  c.noise = moe::Noise::fixed;
  c.noise_scale = moe::NoiseScale::linear;
  c.noise_stddev = 0.3f;
  c.aux_alpha = 0.02f;
  c.z_alpha = 0.001f;
  c.normalize_by_k = true;
  c.residual = true;
  c.tie_break = moe::TieBreak::low;
  c.router_bias = true;
  c.router_init_std = 0.1f;
  c.seed = 18446744073709551615ull;
  const std::string j = moe::config_to_json(c);
  const MoEConfig r = moe::config_from_json(j);
  EXPECT_EQ(r.d_model, 12);
  EXPECT_EQ(r.n_experts, 6);
  EXPECT_EQ(r.k, 3);
  EXPECT_EQ(r.expert, moe::ExpertKind::swiglu);
  EXPECT_EQ(r.d_ff, 20);
  EXPECT_EQ(r.d_out, 12);
  EXPECT_EQ(r.activation, moe::Activation::silu);
  EXPECT_FALSE(r.expert_bias);
  EXPECT_EQ(r.capacity_factor, std::optional<double>(1.5));
  EXPECT_EQ(r.drop_policy, moe::DropPolicy::probs);
  EXPECT_EQ(r.noise, moe::Noise::fixed);
  EXPECT_EQ(r.noise_scale, moe::NoiseScale::linear);
  EXPECT_EQ(r.noise_stddev, 0.3f);
  EXPECT_EQ(r.aux_alpha, 0.02f);
  EXPECT_EQ(r.z_alpha, 0.001f);
  EXPECT_TRUE(r.normalize_by_k);
  EXPECT_TRUE(r.residual);
  EXPECT_EQ(r.tie_break, moe::TieBreak::low);
  EXPECT_TRUE(r.router_bias);
  EXPECT_EQ(r.router_init_std, 0.1f);
  EXPECT_EQ(r.seed, 18446744073709551615ull);
  EXPECT_EQ(moe::config_to_json(r), j);
  // Floats are written as their shortest decimal.
  EXPECT_NE(j.find("\"aux_alpha\":0.02"), std::string::npos) << j;
  EXPECT_NE(j.find("\"expert\":\"swiglu\""), std::string::npos) << j;
}

TEST(ConfigJson, DefaultsAndDroplessNull) {
  const MoEConfig r = moe::config_from_json(R"({"d_model":4,"n_experts":2,"k":1})");
  EXPECT_FALSE(r.capacity_factor.has_value());
  EXPECT_EQ(r.expert, MoEConfig{}.expert);
  MoEConfig c;
  c.d_model = 4;
  c.n_experts = 2;
  EXPECT_NE(moe::config_to_json(c).find("\"capacity_factor\":null"), std::string::npos);
  EXPECT_FALSE(moe::config_from_json(moe::config_to_json(c)).capacity_factor.has_value());
}

TEST(ConfigJson, RefusesBadInputNamingTheField) {
  const std::string base = R"("d_model":4,"n_experts":2)";
  auto with = [&](const std::string& extra) { return "{" + base + "," + extra + "}"; };
  EXPECT_TRUE(
      throws_error_with([&] { moe::config_from_json(with(R"("kk":1)")); }, "unknown field 'kk'"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("k":1.5)")); },
                                "config k: expected a whole number"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("k":"2")")); }, "config k"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("residual":1)")); },
                                "config residual: expected true or false"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("expert":"moe")")); },
                                "expert: unknown kind 'moe'"));
  EXPECT_TRUE(
      throws_error_with([&] { moe::config_from_json(with(R"("seed":-1)")); }, "config seed"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("noise_stddev":1e300)")); },
                                "out of float range"));
  // Values are validated like any MoEConfig.
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("k":3)")); }, "k: must be in"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json(with(R"("capacity_factor":0)")); },
                                "capacity_factor"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json("[1]"); }, "expected a JSON object"));
  EXPECT_TRUE(throws_error_with([&] { moe::config_from_json("{"); }, "not valid JSON"));
}
