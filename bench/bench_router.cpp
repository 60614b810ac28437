// Routing throughput: T = 16384 tokens, d = 1024, E ∈ {8, 64, 256},
// k ∈ {1, 2, 8}. Each benchmark reports tokens/s and splits its time into the GEMM and the
// per-token part (noise, KeepTopK, softmax), timed separately inside the same iterations,
// beside the GEMM's GFLOP/s and the machine's plain one-call sgemm rate on the same shape.
//
//   BM_RouteEval/E/k   evaluation: h = x·W_g, KeepTopK, kept softmax and probs
//   BM_RouteTrain/E/k  training, learned softplus noise drawn from the seed: one GEMM
//                      against [W_g | W_noise] (d, 2E), Philox ε, H, KeepTopK, softmaxes
//   BM_SelectSoftmax/E/k/probs  the per-token part alone on fixed logits: KeepTopK and the
//                      kept softmax (probs = 0; compared with torch.topk + softmax by
//                      bench/peers/router_peer.py) or, as routing runs it, also probs =
//                      softmax over all E (probs = 1; compared with torch adding that softmax)
//   BM_Sgemm/N         one oneDNN sgemm call (T, d)·(d, N), for the machine's GEMM rate
//   BM_DecodeStep/T/cold  evaluation routing of T tokens (1, 8) with a Qwen3-30B-A3B router
//                      (d 2048, E 128, top-8 softmax then renormalized): a decode step. cold 1:
//                      each call on the next of 64 copies of W_g (64 MiB, past the last-level
//                      cache), as a decode step finds it after the rest of the model ran;
//                      GB/s counts W_g's bytes.
//
// Run with OMP_NUM_THREADS=2; bench/run_router_bench.sh prints the table of docs/benchmarks.md.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <chrono>
#include <random>
#include <vector>

#include "common/gemm.hpp"
#include "moe/router.hpp"
#include "router/router_rows.hpp"

namespace {

constexpr int64_t kT = 16384, kD = 1024;

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Inputs {
  std::vector<float> x, W_g, W_noise, logits;
  explicit Inputs(int64_t E) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    x.resize(static_cast<size_t>(kT * kD));
    W_g.resize(static_cast<size_t>(kD * E));
    W_noise.resize(static_cast<size_t>(kD * E));
    for (auto& v : x) v = nd(rng);
    for (auto& v : W_g) v = nd(rng) * 0.03f;
    for (auto& v : W_noise) v = nd(rng) * 0.03f;
    logits.resize(static_cast<size_t>(kT * E));
    for (auto& v : logits) v = nd(rng);
  }
};

moe::RouterConfig config(int64_t E, int64_t k, bool learned) {
  moe::RouterConfig cfg;
  cfg.d_model = kD;
  cfg.n_experts = E;
  cfg.k = k;
  cfg.noise = learned ? moe::Noise::learned : moe::Noise::none;
  return cfg;
}

void set_counters(benchmark::State& st, double route_s, double gemm_s, double rows_s, int64_t N,
                  int64_t iters) {
  const double n = static_cast<double>(iters);
  st.counters["route_ms"] = route_s / n * 1e3;
  st.counters["gemm_ms"] = gemm_s / n * 1e3;
  st.counters["rows_ms"] = rows_s / n * 1e3;  // noise + select + softmax
  st.counters["gemm_GFLOPs"] = 2.0 * kT * kD * N * n / gemm_s / 1e9;
  st.counters["route_over_gemm"] = route_s / gemm_s;
  st.counters["tokens_per_s"] = kT * n / route_s;
}

// Whole routing, timed as the manual iteration time; then, in the same iteration, its two
// parts run and are timed on their own (the same calls router_forward makes).
void route_bench(benchmark::State& st, bool training) {
  const int64_t E = st.range(0), k = st.range(1);
  const Inputs in(E);
  const moe::RouterConfig cfg = config(E, k, training);
  moe::RouterParams p;
  p.W_g = in.W_g.data();
  p.W_noise = in.W_noise.data();
  moe::NoiseSource ns;
  ns.seed = 1;
  moe::RouterState s, parts;
  const int64_t N = training ? 2 * E : E;
  std::vector<float> wcat(static_cast<size_t>(kD * N)), prod(static_cast<size_t>(kT * N));
  for (int64_t i = 0; i < kD; ++i)
    for (int64_t e = 0; e < E; ++e) {
      wcat[i * N + e] = in.W_g[i * E + e];
      if (training) wcat[i * N + E + e] = in.W_noise[i * E + e];
    }
  moe::router_forward(s, in.x.data(), p, cfg, kT, training, ns);  // warm: sizes the buffers
  moe::detail::router_state_resize(parts, cfg, kT, training);
  double route_s = 0, gemm_s = 0, rows_s = 0;
  int64_t iters = 0;
  for (auto _ : st) {
    auto t0 = Clock::now();
    moe::router_forward(s, in.x.data(), p, cfg, kT, training, ns);
    const double r = seconds_since(t0);
    st.SetIterationTime(r);
    route_s += r;

    t0 = Clock::now();
    moe::detail::gemm_f32_rows(prod.data(), N, in.x.data(), wcat.data(), kT, kD, N);
    gemm_s += seconds_since(t0);
    moe::detail::RouterRowsInput rin;
    rin.h = prod.data();
    rin.ldh = N;
    rin.pre = training ? prod.data() + E : nullptr;
    rin.ldpre = N;
    t0 = Clock::now();
    moe::detail::router_rows_f32(parts, rin, cfg, training, ns);
    rows_s += seconds_since(t0);
    ++iters;
    benchmark::DoNotOptimize(s.weights.data());
    benchmark::DoNotOptimize(parts.weights.data());
  }
  set_counters(st, route_s, gemm_s, rows_s, N, iters);
  st.counters["threads"] = omp_get_max_threads();
}

void BM_RouteEval(benchmark::State& st) { route_bench(st, false); }
void BM_RouteTrain(benchmark::State& st) { route_bench(st, true); }

void BM_SelectSoftmax(benchmark::State& st) {
  const int64_t E = st.range(0), k = st.range(1);
  const Inputs in(E);
  const moe::RouterConfig cfg = config(E, k, false);
  moe::RouterState s;
  moe::detail::router_state_resize(s, cfg, kT, false);
  // The logits where routing's GEMM leaves them: in the state, read in place.
  s.logits = in.logits;
  moe::detail::RouterRowsInput rin;
  rin.h = s.logits.data();
  rin.ldh = E;
  rin.probs = st.range(2) != 0;
  for (auto _ : st) {
    moe::detail::router_rows_f32(s, rin, cfg, false, moe::NoiseSource{});
    benchmark::DoNotOptimize(s.weights.data());
  }
  st.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(kT),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Sgemm(benchmark::State& st) {
  const int64_t N = st.range(0);
  const Inputs in(N);
  std::vector<float> C(static_cast<size_t>(kT * N));
  for (auto _ : st) {
    moe::detail::gemm_f32(false, false, kT, N, kD, 1.0f, in.x.data(), kD, in.W_g.data(), N, 0.0f,
                          C.data(), N);
    benchmark::DoNotOptimize(C.data());
  }
  st.counters["GFLOPs"] = benchmark::Counter(2.0 * kT * kD * static_cast<double>(N),
                                             benchmark::Counter::kIsIterationInvariantRate,
                                             benchmark::Counter::kIs1000);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int64_t E : {8, 64, 256})
    for (int64_t k : {1, 2, 8}) b->Args({E, k});
}

}  // namespace

void BM_DecodeStep(benchmark::State& st) {
  const int64_t T = st.range(0), d = 2048, E = 128, copies = st.range(1) ? 64 : 1;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * d)), W(static_cast<size_t>(copies * d * E));
  for (auto& v : x) v = nd(rng);
  for (auto& v : W) v = nd(rng) * 0.02f;
  moe::RouterConfig cfg;
  cfg.d_model = d;
  cfg.n_experts = E;
  cfg.k = 8;
  cfg.kind = moe::RouterKind::softmax_topk;
  cfg.renormalize = true;
  moe::RouterParams p;
  moe::RouterState s;
  moe::NoiseSource ns;
  int64_t next = 0;
  for (auto _ : st) {
    p.W_g = W.data() + next * d * E;
    next = (next + 1) % copies;
    moe::router_forward(s, x.data(), p, cfg, T, false, ns);
    benchmark::DoNotOptimize(s.weights.data());
  }
  st.counters["GB/s"] = benchmark::Counter(static_cast<double>(d * E * 4),
                                           benchmark::Counter::kIsIterationInvariantRate);
  st.counters["threads"] = omp_get_max_threads();
}

BENCHMARK(BM_RouteEval)->Apply(shapes)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RouteTrain)->Apply(shapes)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SelectSoftmax)
    ->Apply([](benchmark::internal::Benchmark* b) {
      for (int64_t p : {0, 1})
        for (int64_t E : {8, 64, 256})
          for (int64_t k : {1, 2, 8}) b->Args({E, k, p});
    })
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Sgemm)->Arg(8)->Arg(16)->Arg(64)->Arg(128)->Arg(256)->Arg(512)->Unit(
    benchmark::kMillisecond);

BENCHMARK(BM_DecodeStep)
    ->ArgsProduct({{1, 8}, {0, 1}})
    ->ArgNames({"T", "cold"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
