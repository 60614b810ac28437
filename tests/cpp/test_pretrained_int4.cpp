// The pretrained loader's GPTQ path (src/io/pretrained*.cpp) at the C++ level, under
// ASan/UBSan by scripts/sanitize.sh: a Mixtral-layout GPTQ folder (act-order g_idx, v1 zero
// points) whose int32 tensors start 2 bytes off their alignment (an F16 tensor of odd length
// first), loaded with precision_auto (int4 as stored, repacked) and with fp32 (decoded row by
// row): both hold gptq_dequant_ref of the same words, bit for bit. The same settings in
// quantize_config.json (older AutoGPTQ) give the same layer; the two files disagreeing are an
// error naming both.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <algorithm>
#include <string>
#include <vector>

#include "moe/error.hpp"
#include "moe/pretrained.hpp"
#include "quant/format.hpp"
#include "quant/int4_import.hpp"
#include "test_layer_util.hpp"

namespace {

struct Raw {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <typename T>
Raw raw(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
        const std::vector<T>& v) {
  Raw r{name, dtype, std::move(shape), std::vector<uint8_t>(v.size() * sizeof(T))};
  std::memcpy(r.bytes.data(), v.data(), r.bytes.size());
  return r;
}

void write_raw(const std::string& path, const std::vector<Raw>& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::vector<uint8_t> data;
  for (const Raw& t : tensors) {
    const size_t begin = data.size();
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  const uint64_t n = text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(text.data(), static_cast<std::streamsize>(n));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

TEST(PretrainedInt4, GptqActOrderMisalignedLoadsAsStoredAndDecoded) {
  const int64_t d = 64, E = 3, F = 96, k = 2, group = 32;
  moe_test::Rng rng(5);
  std::mt19937 gen(7);
  const std::string base = "model.layers.0.block_sparse_moe.";
  std::vector<Raw> tensors;
  // 3 F16 values: every tensor after it starts 6 bytes into the data, off int32 alignment.
  tensors.push_back(raw<uint16_t>("aaa.pad", "F16", {3}, {0, 0, 0}));
  std::vector<uint16_t> router(static_cast<size_t>(E * d));
  for (uint16_t& h : router) h = moe::detail::f32_to_f16(static_cast<float>(rng.sym(1.0)));
  tensors.push_back(raw("aaa.router", "F16", {E, d}, router));
  struct Mat {
    std::string name;
    moe::detail::GptqInt4 t;
    std::vector<int32_t> qweight, qzeros, g_idx;
    std::vector<uint16_t> scales;
  };
  std::vector<Mat> mats;
  for (int64_t e = 0; e < E; ++e)
    for (const char* w : {"w1", "w2", "w3"}) {
      Mat m;
      m.name = base + "experts." + std::to_string(e) + "." + w;
      const int64_t K = w[1] == '2' ? F : d, N = w[1] == '2' ? d : F, G = K / group;
      m.qweight.resize(static_cast<size_t>(K / 8 * N));
      m.qzeros.resize(static_cast<size_t>(G * N / 8));
      for (int32_t& x : m.qweight) x = static_cast<int32_t>(gen());
      for (int32_t& x : m.qzeros) x = static_cast<int32_t>(gen());
      m.scales.resize(static_cast<size_t>(G * N));
      for (uint16_t& s : m.scales)
        s = moe::detail::f32_to_f16(0.01f + 0.04f * static_cast<float>(gen() % 1000) / 1000.0f);
      // act-order: the rows' groups by their rank in a random visiting order
      std::vector<int32_t> order(static_cast<size_t>(K));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), gen);
      m.g_idx.resize(static_cast<size_t>(K));
      for (int64_t r = 0; r < K; ++r) m.g_idx[static_cast<size_t>(order[r])] = static_cast<int32_t>(r / group);
      mats.push_back(std::move(m));
    }
  for (Mat& m : mats) {
    const int64_t K = static_cast<int64_t>(m.g_idx.size()), N = static_cast<int64_t>(m.scales.size()) / (K / group);
    tensors.push_back(raw(m.name + ".g_idx", "I32", {K}, m.g_idx));
    tensors.push_back(raw(m.name + ".qweight", "I32", {K / 8, N}, m.qweight));
    tensors.push_back(raw(m.name + ".qzeros", "I32", {K / group, N / 8}, m.qzeros));
    tensors.push_back(raw(m.name + ".scales", "F16", {K / group, N}, m.scales));
    m.t = {K, N, group, m.qweight.data(), m.qzeros.data(), m.scales.data(), m.g_idx.data(), true};
  }
  tensors[1].name = base + "gate.weight";
  const nlohmann::json config = {
      {"model_type", "mixtral"},  {"hidden_size", d},       {"num_hidden_layers", 1},
      {"hidden_act", "silu"},     {"num_experts_per_tok", k}, {"num_local_experts", E},
      {"intermediate_size", F},
      {"quantization_config", {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", group},
                               {"sym", false}, {"desc_act", true}, {"checkpoint_format", "gptq"}}}};
  const auto dir = std::filesystem::path(::testing::TempDir()) / "pretrained_int4";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump();
  write_raw((dir / "model.safetensors").string(), tensors);

  const int threads = omp_get_max_threads();
  omp_set_num_threads(2);
  const moe::MoELayer stored = moe::load_pretrained(dir.string(), 0, moe::precision_auto);
  const moe::MoELayer decoded = moe::load_pretrained(dir.string(), 0, moe::Precision::fp32);
  omp_set_num_threads(threads);
  EXPECT_EQ(stored.config().precision, moe::Precision::int4);
  for (const char* name : {"W1", "W2", "W3"}) {
    const moe::Tensor a = stored.expert_matrix(name), b = decoded.expert_matrix(name);
    EXPECT_EQ(a.data, b.data) << name;
    const char* w = name[1] == '1' ? "w1" : name[1] == '2' ? "w2" : "w3";
    for (int64_t e = 0; e < E; ++e) {
      const Mat* m = nullptr;
      for (const Mat& x : mats)
        if (x.name == base + "experts." + std::to_string(e) + "." + w) m = &x;
      ASSERT_NE(m, nullptr);
      std::vector<double> ref(static_cast<size_t>(m->t.K * m->t.N));
      moe::detail::gptq_dequant_ref(m->t, ref.data());
      for (size_t i = 0; i < ref.size(); ++i)
        ASSERT_EQ(a.data[static_cast<size_t>(e) * ref.size() + i], static_cast<float>(ref[i]))
            << m->name << " at " << i;
    }
  }

  // The same settings in quantize_config.json (AutoGPTQ before quantization_config: no
  // quant_method, meaning gptq), config.json without them: the same layer.
  nlohmann::json bare = config;
  bare.erase("quantization_config");
  const nlohmann::json quantize = {{"bits", 4},           {"group_size", group},
                                   {"sym", false},        {"desc_act", true},
                                   {"true_sequential", true}, {"model_file_base_name", "model"}};
  std::ofstream(dir / "config.json", std::ios::trunc) << bare.dump();
  std::ofstream(dir / "quantize_config.json") << quantize.dump();
  {
    const moe::MoELayer old = moe::load_pretrained(dir.string(), 0, moe::precision_auto);
    EXPECT_EQ(old.config().precision, moe::Precision::int4);
    for (const char* name : {"W1", "W2", "W3"})
      EXPECT_EQ(old.expert_matrix(name).data, stored.expert_matrix(name).data) << name;
    const int64_t T = 5;
    const std::vector<float> x = rng.vec(T * d, 1.0);
    std::vector<float> y_old(static_cast<size_t>(T * d)), y_new(y_old.size());
    moe::ForwardOptions fo;
    fo.training = false;
    moe::MoELayer a = moe::load_pretrained(dir.string(), 0, moe::precision_auto);
    moe::MoELayer b = moe::load_pretrained(dir.string(), 0, moe::Precision::int4);
    a.forward(y_old.data(), x.data(), T, fo);
    std::ofstream(dir / "config.json", std::ios::trunc) << config.dump();  // both files, agreeing
    moe::MoELayer c = moe::load_pretrained(dir.string(), 0, moe::precision_auto);
    c.forward(y_new.data(), x.data(), T, fo);
    EXPECT_EQ(y_old, y_new);
    b.forward(y_new.data(), x.data(), T, fo);
    EXPECT_EQ(y_old, y_new);
  }
  // Both files, disagreeing on group_size: an error naming both files and the key.
  nlohmann::json other = quantize;
  other["group_size"] = 2 * group;
  std::ofstream(dir / "quantize_config.json", std::ios::trunc) << other.dump();
  try {
    (void)moe::load_pretrained(dir.string(), 0, moe::precision_auto);
    ADD_FAILURE() << "disagreeing files loaded";
  } catch (const moe::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("config.json of '" + dir.string() + "': quantization_config.group_size is "
                     "32, but quantize_config.json of '" + dir.string() + "' has group_size = "
                     "64; the two files must agree"),
              std::string::npos)
        << m;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
