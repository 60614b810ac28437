// The MoE layer at B1 and B2 (src/perf/suite.hpp) as Google Benchmark cases: forward (training mode)
// and forward+backward. Counters: GFLOP/s (routed expert FLOPs on T·k rows plus the
// router's; forward+backward counts 3x the forward), the roof (oneDNN sgemm on the dense
// [T·k, d] x [d, d_ff] GEMM, timed outside the case's time before every iteration: the VM's
// rate drifts by ±20%, so each iteration is set beside its own roof sample; the median) and
// the share of the roof reached (median of the per-iteration ratios). `moe bench` is the
// full harness (peer, memory, goals); this is the kernel-level view for profilers and A/B
// runs.
//
//   OMP_NUM_THREADS=2 build/bin/bench_layer --benchmark_filter=B1
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moe/layer.hpp"
#include "perf/roofline.hpp"
#include "perf/suite.hpp"

namespace {

using moe::perf::BenchCase;

BenchCase find_case(const std::string& name) {
  for (const auto& c : moe::perf::bench_cases(false))
    if (c.name == name) return c;
  return {};
}

// One layer, inputs and roof per configuration, kept across the repeated calls Google
// Benchmark makes while it settles on an iteration count.
struct Setup {
  BenchCase c;
  std::unique_ptr<moe::MoELayer> layer;
  std::vector<float> x, dy, y, dx;
  std::unique_ptr<moe::perf::SgemmRoof> roof;
};

Setup& setup(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Setup>> cache;
  auto& s = cache[name];
  if (s) return *s;
  cache.clear();  // one configuration resident at a time
  auto& fresh = cache[name];
  fresh = std::make_unique<Setup>();
  Setup& u = *fresh;
  u.c = find_case(name);
  const moe::MoEConfig& m = u.c.cfg;
  const int64_t T = u.c.T, d = m.d_model, Do = m.out_dim();
  u.x.resize(static_cast<size_t>(T * d));
  u.dx.resize(u.x.size());
  u.dy.resize(static_cast<size_t>(T * Do));
  u.y.resize(u.dy.size());
  for (size_t i = 0; i < u.x.size(); ++i) u.x[i] = static_cast<float>(i % 253) / 126.5f - 1.0f;
  for (size_t i = 0; i < u.dy.size(); ++i) u.dy[i] = static_cast<float>(i % 247) / 123.5f - 1.0f;
  u.roof = std::make_unique<moe::perf::SgemmRoof>(T * m.k, m.hidden(), d);
  u.roof->run_s();  // warm-up
  u.layer = std::make_unique<moe::MoELayer>(m);
  return u;
}

void run(benchmark::State& state, const std::string& name, bool backward) {
  Setup& u = setup(name);
  const BenchCase& c = u.c;
  moe::MoELayer& layer = *u.layer;
  moe::ForwardOptions fo;
  fo.training = c.training;
  auto step = [&] {
    layer.forward(u.y.data(), u.x.data(), c.T, fo);
    if (backward) layer.backward(u.dx.data(), u.dy.data());
  };
  step();  // warm-up: sizes the workspace

  const double flops = moe::perf::layer_flops_fwd(c) * (backward ? 3.0 : 1.0);
  double total = 0.0;
  std::vector<double> roofs, shares;
  for (auto _ : state) {
    state.PauseTiming();
    const double roof = u.roof->flops() / u.roof->run_s() / 1e9;
    state.ResumeTiming();
    const double t0 = moe::perf::now_s();
    step();
    const double t = moe::perf::now_s() - t0;
    total += t;
    roofs.push_back(roof);
    shares.push_back(flops / t / 1e9 / roof);
    benchmark::DoNotOptimize(u.y.data());
  }
  const double gflops = flops * static_cast<double>(state.iterations()) / total / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["roof_GFLOP/s"] = moe::perf::median(roofs);
  state.counters["roof_share"] = moe::perf::median(shares);
  state.counters["dropped"] = static_cast<double>(layer.stats().dropped_assignments);
}

void BM_layer_fwd_B1(benchmark::State& s) { run(s, "B1", false); }
void BM_layer_fwdbwd_B1(benchmark::State& s) { run(s, "B1", true); }
void BM_layer_fwd_B2(benchmark::State& s) { run(s, "B2", false); }
void BM_layer_fwdbwd_B2(benchmark::State& s) { run(s, "B2", true); }

BENCHMARK(BM_layer_fwd_B1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_layer_fwdbwd_B1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_layer_fwd_B2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_layer_fwdbwd_B2)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
