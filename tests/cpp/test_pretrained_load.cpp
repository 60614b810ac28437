// The pretrained loader's bf16 path (src/io/pretrained.cpp: one thread reads the stored
// matrices with pread in file order, the others pack them) against its decoding path: a
// Mixtral-layout folder written twice, in BF16 and in F32 with the same (bf16-exact) values,
// loads into the same layer, bit for bit, and holds exactly the values written. Run under
// ASan/UBSan by scripts/sanitize.sh, with two threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "moe/pretrained.hpp"
#include "test_layer_util.hpp"

namespace {

struct Stored {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;  // row-major
};

// A safetensors file of the tensors in `dtype` ("F32" or "BF16"), in the given order.
void write_safetensors(const std::string& path, const std::vector<Stored>& tensors,
                       const std::string& dtype) {
  const size_t width = dtype == "BF16" ? 2 : 4;
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::vector<uint8_t> data;
  for (const Stored& t : tensors) {
    const size_t begin = data.size();
    for (float v : t.values) {
      uint8_t bytes[4];
      if (width == 2) {
        const uint16_t h = moe::detail::to_bf16(v);
        std::memcpy(bytes, &h, 2);
      } else {
        std::memcpy(bytes, &v, 4);
      }
      data.insert(data.end(), bytes, bytes + width);
    }
    header[t.name] = {{"dtype", dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
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

TEST(PretrainedLoad, Bf16ReaderAndPackersEqualTheDecodingPath) {
  const int64_t d = 48, E = 12, F = 40, k = 2;
  moe_test::Rng rng(21);
  const auto bf16_values = [&](int64_t n) {
    std::vector<float> v = rng.vec(n, 1.0);
    for (float& x : v) x = moe::detail::round_bf16(x);  // the same values in both files
    return v;
  };
  std::vector<Stored> tensors;
  const std::string base = "model.layers.0.block_sparse_moe.";
  tensors.push_back({base + "gate.weight", {E, d}, bf16_values(E * d)});
  // Experts in the order a writer that sorts names uses: experts.10 before experts.2.
  std::vector<std::string> ids;
  for (int64_t e = 0; e < E; ++e) ids.push_back(std::to_string(e));
  std::sort(ids.begin(), ids.end());
  for (const std::string& e : ids) {
    const std::string x = base + "experts." + e + ".";
    tensors.push_back({x + "w1.weight", {F, d}, bf16_values(F * d)});
    tensors.push_back({x + "w2.weight", {d, F}, bf16_values(d * F)});
    tensors.push_back({x + "w3.weight", {F, d}, bf16_values(F * d)});
  }
  const nlohmann::json config = {{"model_type", "mixtral"},   {"hidden_size", d},
                                 {"num_hidden_layers", 1},    {"hidden_act", "silu"},
                                 {"num_experts_per_tok", k},  {"num_local_experts", E},
                                 {"intermediate_size", F}};
  const std::filesystem::path root = std::filesystem::path(::testing::TempDir()) / "pretrained_load";
  std::vector<std::string> dirs;
  for (const std::string dtype : {"BF16", "F32"}) {
    const auto dir = root / dtype;
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "config.json") << config.dump();
    write_safetensors((dir / "model.safetensors").string(), tensors, dtype);
    dirs.push_back(dir.string());
  }
  const int threads = omp_get_max_threads();
  omp_set_num_threads(2);  // a reader and a packer
  const moe::MoELayer direct = moe::load_pretrained(dirs[0], 0, moe::Precision::bf16);
  const moe::MoELayer decoded = moe::load_pretrained(dirs[1], 0, moe::Precision::bf16);
  for (const char* name : {"W1", "W2", "W3"}) {
    const moe::Tensor a = direct.expert_matrix(name), b = decoded.expert_matrix(name);
    ASSERT_EQ(a.shape, (std::vector<int64_t>{E, name[1] == '2' ? F : d, name[1] == '2' ? d : F}));
    EXPECT_EQ(a.data, b.data) << name;
    // Expert e's (in × out) matrix is the stored (out, in) one transposed.
    const int64_t In = a.shape[1], Out = a.shape[2];
    const std::string w = name[1] == '1' ? "w1" : name[1] == '2' ? "w2" : "w3";
    for (int64_t e = 0; e < E; ++e) {
      const std::string want = base + "experts." + std::to_string(e) + "." + w + ".weight";
      const Stored* s = nullptr;
      for (const Stored& t : tensors)
        if (t.name == want) s = &t;
      ASSERT_NE(s, nullptr);
      for (int64_t i = 0; i < In; ++i)
        for (int64_t o = 0; o < Out; ++o)
          ASSERT_EQ(a.data[(e * In + i) * Out + o], s->values[o * In + i]) << want;
    }
  }
  omp_set_num_threads(threads);
  std::filesystem::remove_all(root);
}

}  // namespace
