// Determinism as a promise: routing and a training step give the same bits
// with 1 and 2 OpenMP threads, and in two separate processes.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <unistd.h>

#include "moe/moe.hpp"

namespace {

// Every output of one routing call and one training step, as raw bytes.
struct Outputs {
  std::vector<char> bytes;
  template <typename T>
  void add(const std::vector<T>& v) {
    const char* p = reinterpret_cast<const char*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(T));
  }
  void add(double v) {
    const char* p = reinterpret_cast<const char*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof v);
  }
};

// Deterministic test data that do not depend on the library: a fixed LCG.
std::vector<float> data(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint64_t s = seed * 2862933555777941757ull + 3037000493ull;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<float>(static_cast<double>(s >> 11) * (2.0 / 9007199254740992.0) - 1.0);
  }
  return v;
}

// Routes and trains one batch: learned noise drawn from the generator, capacity with drops,
// both losses, so that every parallel stage (GEMMs, top-k, capacity plan, grouped experts,
// combine, backward) runs. T is off every tile size on purpose.
Outputs run_once(int threads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  Outputs r;
  moe::MoEConfig c;
  c.d_model = 24;
  c.n_experts = 6;
  c.k = 2;
  c.expert = moe::ExpertKind::swiglu;
  c.d_ff = 40;
  c.capacity_factor = 1.0;
  c.aux_alpha = 0.01f;
  c.z_alpha = 0.001f;
  c.router_init_std = 0.5f;
  c.seed = 11;
  const int64_t T = 157;
  const auto x = data(T * c.d_model, 1);
  const auto dy = data(T * c.d_model, 2);

  // The router alone.
  std::vector<float> Wg = data(c.d_model * c.n_experts, 3), Wn = data(c.d_model * c.n_experts, 4);
  moe::RouterParams p;
  p.W_g = Wg.data();
  p.W_noise = Wn.data();
  moe::RouterState s;
  moe::NoiseSource ns;
  ns.seed = 5;
  ns.step = 2;
  moe::router_forward(s, x.data(), p, c.router(), T, /*training=*/true, ns);
  r.add(s.indices);
  r.add(s.weights);
  r.add(s.probs);

  // Two training steps of the layer (forward, backward, plain SGD), so that the second
  // step starts from parameters the first one computed.
  moe::MoELayer L(c);
  std::vector<float> y(static_cast<size_t>(T * c.d_model)), dx(y.size());
  for (uint64_t step = 0; step < 2; ++step) {
    moe::ForwardOptions o;
    o.step = step;
    L.zero_grad();
    L.forward(y.data(), x.data(), T, o);
    L.backward(dx.data(), dy.data());
    r.add(y);
    r.add(dx);
    r.add(L.aux_loss());
    r.add(L.z_loss());
    r.add(L.stats().load_after);
    for (const auto& n : L.parameter_names()) {
      r.add(L.grad(n).data);
      auto& w = L.param(n).data;
      const auto& g = L.grad(n).data;
      for (size_t i = 0; i < w.size(); ++i) w[i] -= 0.1f * g[i];
    }
  }
  omp_set_num_threads(saved);
  return r;
}

TEST(Determinism, OneAndTwoThreadsGiveTheSameBits) {
  const Outputs one = run_once(1);
  const Outputs two = run_once(2);
  ASSERT_EQ(one.bytes.size(), two.bytes.size());
  EXPECT_TRUE(one.bytes == two.bytes) << "results differ between 1 and 2 threads";
  // The same call twice in one process, for good measure (no state leaks between layers).
  EXPECT_TRUE(run_once(2).bytes == two.bytes);
}

// The child half of the cross-process test: runs only when the parent asks for it.
TEST(Determinism, ChildWritesItsBits) {
  const char* out = std::getenv("MOE_DETERMINISM_OUT");
  if (!out) GTEST_SKIP() << "runs as a child of AcrossProcesses";
  const Outputs r = run_once(omp_get_max_threads());
  std::ofstream f(out, std::ios::binary);
  f.write(r.bytes.data(), static_cast<std::streamsize>(r.bytes.size()));
  ASSERT_TRUE(f.good());
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

TEST(Determinism, AcrossProcessesAndThreadCounts) {
  // Runs this test binary twice more, with 1 and with 2 threads, each in a fresh process
  // (fresh allocator state and addresses, a fresh OpenMP runtime), and compares the files.
  const std::string self = "/proc/self/exe";
  char exe[4096] = {};
  const ssize_t n = readlink(self.c_str(), exe, sizeof exe - 1);
  ASSERT_GT(n, 0);
  const std::string dir = ::testing::TempDir();
  std::vector<std::vector<char>> outs;
  for (int threads : {1, 2}) {
    // The pid keeps the name apart from other copies of this test that ctest runs at the
    // same time (the whole binary runs again under each ISA level).
    const std::string out = dir + "moe_determinism_" + std::to_string(getpid()) + "_" +
                            std::to_string(threads) + ".bin";
    std::remove(out.c_str());
    const std::string cmd = "OMP_NUM_THREADS=" + std::to_string(threads) +
                            " MOE_DETERMINISM_OUT='" + out + "' '" + std::string(exe) +
                            "' --gtest_filter=Determinism.ChildWritesItsBits >/dev/null 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    outs.push_back(read_all(out));
    std::remove(out.c_str());
  }
  ASSERT_FALSE(outs[0].empty());
  EXPECT_TRUE(outs[0] == outs[1]) << "results differ between two processes";
  // And the same bits as this process computes.
  EXPECT_TRUE(outs[0] == run_once(2).bytes);
}

}  // namespace
