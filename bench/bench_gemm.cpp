// The roofs of `moe bench` as Google Benchmark kernels: oneDNN sgemm at the shapes the MoE
// benchmarks use — the dense roof GEMM [T·k, d] × [d, d_ff] and the per-expert GEMMs the
// layer actually runs (rows = T·k/E) — called directly (oneDNN threads it) and through
// libmoe's deterministic blocked wrapper gemm_f32; plus the streaming read bandwidth that is
// the decode roof. Counters: GFLOP/s, GB/s.
//
//   build/bin/bench_gemm --benchmark_filter=dnnl   (OMP_NUM_THREADS=2, as the goals are stated)
#include <benchmark/benchmark.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <vector>

#include "common/bf16.hpp"
#include "common/cpu.hpp"
#include "common/gemm.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/int8.hpp"
#include "perf/roofline.hpp"

namespace {

struct Operands {
  std::vector<float> A, B, C;
  Operands(int64_t M, int64_t N, int64_t K)
      : A(static_cast<size_t>(M * K)), B(static_cast<size_t>(K * N)), C(static_cast<size_t>(M * N)) {
    for (size_t i = 0; i < A.size(); ++i) A[i] = static_cast<float>(i % 251) / 251.0f - 0.5f;
    for (size_t i = 0; i < B.size(); ++i) B[i] = static_cast<float>(i % 241) / 241.0f - 0.5f;
  }
};

void set_rate(benchmark::State& state, int64_t M, int64_t N, int64_t K) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(M) * static_cast<double>(N) *
                             static_cast<double>(K) * static_cast<double>(state.iterations()) / 1e9,
                         benchmark::Counter::kIsRate);
}

// C (M, N) = A (M, K) · B (K, N) with oneDNN's own threading: the roof.
void BM_sgemm_dnnl(benchmark::State& state) {
  const int64_t M = state.range(0), N = state.range(1), K = state.range(2);
  Operands op(M, N, K);
  for (auto _ : state) {
    dnnl_sgemm('N', 'N', M, N, K, 1.0f, op.A.data(), K, op.B.data(), N, 0.0f, op.C.data(), N);
    benchmark::DoNotOptimize(op.C.data());
  }
  set_rate(state, M, N, K);
}

// The same through gemm_f32: fixed row/column blocks, one serial sgemm per block.
void BM_sgemm_blocked(benchmark::State& state) {
  const int64_t M = state.range(0), N = state.range(1), K = state.range(2);
  Operands op(M, N, K);
  for (auto _ : state) {
    moe::detail::gemm_f32(false, false, M, N, K, 1.0f, op.A.data(), K, op.B.data(), N, 0.0f,
                          op.C.data(), N);
    benchmark::DoNotOptimize(op.C.data());
  }
  set_rate(state, M, N, K);
}

// Shapes (M, N, K): the roof GEMMs and the per-expert GEMMs of each configuration.
void gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K"});
  b->Args({8192, 2048, 1024});  // B1 and E-sweep roof: [T·k, d] x [d, d_ff]
  b->Args({8192, 512, 1024});   // B2 roof
  b->Args({512, 2048, 1024});   // B1 per expert (T·k/E = 512 rows), W1
  b->Args({512, 1024, 2048});   // B1 per expert, W2
  b->Args({1024, 2048, 1024});  // E8 per expert
  b->Args({128, 2048, 1024});   // E64 per expert
  b->Args({32, 2048, 1024});    // E256 per expert
  b->Args({8, 2048, 1024});     // E1024 per expert
  b->Args({32, 512, 1024});     // B2 per expert
  b->Args({64, 256, 1024});     // one tile of the layer's grouped GEMM (64 x 256, full K), W1
  b->Args({64, 256, 2048});     // one tile, W2
  b->Args({1, 14336, 4096});    // B3 decode, one row per selected expert
  b->Args({4, 14336, 4096});    // B3 T=16, about four rows per expert
  b->UseRealTime();
}

BENCHMARK(BM_sgemm_dnnl)->Apply(gemm_shapes);
BENCHMARK(BM_sgemm_blocked)->Apply(gemm_shapes);

// The tiles of E problems of `rows` rows and N columns: at most tm rows x tn columns each.
struct Tile {
  int64_t e, m0, m, n0, n;
};
std::vector<Tile> tiles_of(int64_t E, int64_t rows, int64_t N, int64_t tm, int64_t tn) {
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m0 = 0; m0 < rows; m0 += tm)
      for (int64_t n0 = 0; n0 < N; n0 += tn)
        tiles.push_back({e, m0, std::min(tm, rows - m0), n0, std::min(tn, N - n0)});
  return tiles;
}

// The layer's expert GEMMs as it runs them (experts/grouped_gemm.cpp): E problems
// [rows, K] x [K, N] cut into fixed tiles of tile_m x tile_n outputs, one serial sgemm per
// tile over the full K, tiles spread over the OpenMP threads. Args: E, rows per expert, N, K,
// tile_m, tile_n. The layer uses 64 x 256 tiles; other sizes show what the tiling costs.
void BM_grouped_tiles(benchmark::State& state) {
  const int64_t E = state.range(0), rows = state.range(1), N = state.range(2), K = state.range(3),
                tm = state.range(4), tn = state.range(5);
  Operands op(E * rows, N, K);
  std::vector<float> W(static_cast<size_t>(E * K * N), 0.25f);
  const std::vector<Tile> tiles = tiles_of(E, rows, N, tm, tn);
  const auto n_tiles = static_cast<int64_t>(tiles.size());
  for (auto _ : state) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tiles; ++i) {
      const Tile& t = tiles[static_cast<size_t>(i)];
      moe::detail::gemm_f32_serial(false, false, t.m, t.n, K, 1.0f,
                                   op.A.data() + (t.e * rows + t.m0) * K, K,
                                   W.data() + t.e * K * N + t.n0, N, 0.0f,
                                   op.C.data() + (t.e * rows + t.m0) * N + t.n0, N);
    }
    benchmark::DoNotOptimize(op.C.data());
  }
  set_rate(state, E * rows, N, K);
}
BENCHMARK(BM_grouped_tiles)
    ->ArgNames({"E", "rows", "N", "K", "tm", "tn"})
    ->Args({16, 512, 2048, 1024, 64, 256})    // B1 W1, the layer's tiles
    ->Args({16, 512, 2048, 1024, 512, 256})   // B1 W1, all rows of an expert per tile
    ->Args({16, 512, 2048, 1024, 128, 1024})  // B1 W1, wider tiles
    ->Args({256, 32, 512, 1024, 64, 256})     // B2 W1, the layer's tiles
    ->Args({64, 8, 2048, 1024, 64, 256})      // E1024-like: 8 rows per expert (64 of them)
    ->UseRealTime();

// The bf16 roof of this machine, measured once per run: oneDNN's bf16 matmul at a dense
// 2048³ shape (perf/roofline.hpp), GFLOP/s. Every bf16 row reports its ratio to it.
double bf16_roof_gflops() {
  static const double gflops = [] {
    moe::perf::Bf16Roof roof(2048, 2048, 2048);
    std::vector<double> t;
    for (int i = 0; i < 5; ++i) t.push_back(roof.run_s());
    return roof.flops() / moe::perf::median(t) / 1e9;
  }();
  return gflops;
}

// The layer's bf16 expert products: E problems [rows, K] x [K, N] with distinct weights, in
// tiles of at most 512 rows x 2048 columns spread over the threads (experts/grouped_gemm.cpp).
// packed = 0: oneDNN's run-time-size matmul on row-major weights (gemm_bf16_serial, which
// packs B per call); packed = 1: the weights packed once (gemm_bf16_packed_serial, the kernel
// its dispatch picks); 2: the vdpbf16ps kernel by name; 3: the AMX kernel by name (skipped
// without AMX). Random operands in [-0.5, 0.5). roof_ratio: GFLOP/s over bf16_roof_gflops().
void BM_grouped_bf16(benchmark::State& state) {
  const int64_t E = state.range(0), rows = state.range(1), N = state.range(2), K = state.range(3);
  const int64_t kernel = state.range(4);
  const bool packed = kernel != 0;
  if (kernel == 3 && !moe::detail::amx_hardware())
    return state.SkipWithError("no AMX on this CPU (or MOE_MAX_ISA below amx)");
  if (kernel == 2 && !moe::detail::packed_bf16_native())
    return state.SkipWithError("no AVX512-BF16 on this CPU (or MOE_MAX_ISA below it)");
  const int64_t tm = 512, tn = 2048;
  std::vector<uint16_t> A(static_cast<size_t>(E * rows * K));
  std::vector<float> Wf(static_cast<size_t>(K * N));
  uint32_t seed = 12345;
  auto next = [&] {
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
  };
  for (auto& v : A) v = moe::detail::to_bf16(next());
  const int64_t wsize = packed ? moe::detail::packed_bf16_size(K, N) : K * N;
  std::vector<uint16_t> W(static_cast<size_t>(E * wsize));
  for (int64_t e = 0; e < E; ++e) {
    for (auto& v : Wf) v = next();
    if (packed)
      moe::detail::pack_bf16(W.data() + e * wsize, Wf.data(), N, 1, K, N);
    else
      moe::detail::to_bf16_n(W.data() + e * wsize, Wf.data(), K * N);
  }
  std::vector<float> C(static_cast<size_t>(E * rows * N));
  const std::vector<Tile> tiles = tiles_of(E, rows, N, tm, tn);
  const auto n_tiles = static_cast<int64_t>(tiles.size());
  for (auto _ : state) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tiles; ++i) {
      const Tile& t = tiles[static_cast<size_t>(i)];
      const uint16_t* a = A.data() + (t.e * rows + t.m0) * K;
      float* c = C.data() + (t.e * rows + t.m0) * N + t.n0;
      if (kernel == 1)
        moe::detail::gemm_bf16_packed_serial(t.m, t.n0, t.n, K, a, K, W.data() + t.e * wsize,
                                             0.0f, c, N);
      else if (kernel == 2)
        moe::detail::gemm_bf16_packed_avx512(t.m, t.n0, t.n, K, a, K, W.data() + t.e * wsize,
                                             0.0f, c, N);
      else if (kernel == 3)
        moe::detail::gemm_bf16_packed_amx(false, t.m, t.n0, t.n, K, a, K,
                                          W.data() + t.e * wsize, 0.0f, c, N);
      else
        moe::detail::gemm_bf16_serial(t.m, t.n, K, a, K, W.data() + t.e * wsize + t.n0, N, 0.0f,
                                      c, N);
    }
    benchmark::DoNotOptimize(C.data());
  }
  set_rate(state, E * rows, N, K);
  state.counters["roof_ratio"] = benchmark::Counter(
      2.0 * static_cast<double>(E * rows) * static_cast<double>(N) * static_cast<double>(K) *
          static_cast<double>(state.iterations()) / 1e9 / bf16_roof_gflops(),
      benchmark::Counter::kIsRate);
  state.SetLabel(moe::detail::gemm_bf16_packed_impl());
}
BENCHMARK(BM_grouped_bf16)
    ->ArgNames({"E", "rows", "N", "K", "kernel"})
    ->ArgsProduct({{128}, {32}, {768}, {2048}, {0, 1, 2, 3}})    // Qwen3-30B-A3B W1 / W3
    ->ArgsProduct({{128}, {32}, {2048}, {768}, {0, 1, 2, 3}})    // Qwen3-30B-A3B W2
    ->ArgsProduct({{16}, {512}, {2048}, {1024}, {0, 1, 2, 3}})   // B1 W1
    ->ArgsProduct({{16}, {512}, {1024}, {2048}, {0, 1, 2, 3}})   // B1 W2
    ->ArgsProduct({{2}, {128}, {14336}, {4096}, {0, 1, 2, 3}})   // Mixtral-8x7B W1, two experts
    ->ArgsProduct({{2}, {128}, {4096}, {14336}, {0, 1, 2, 3}})   // Mixtral-8x7B W2, two experts
    ->ArgsProduct({{2}, {1}, {14336}, {4096}, {0, 1, 2, 3}})     // decode, one row per expert
    ->ArgsProduct({{2}, {4}, {14336}, {4096}, {1, 2, 3}})        // the AMX row threshold
    ->ArgsProduct({{2}, {16}, {14336}, {4096}, {1, 2, 3}})
    ->UseRealTime();

// The int8 expert products (experts/int8.hpp): E experts' [rows, K] x [K, N] quantized
// products with their dequantizing epilogue, one task per (expert, 64 columns). kernel 1: the
// dispatch's choice; 2: AVX512-VNNI (level avx512); 3: AMX's tdpbusd (skipped without AMX);
// 4: the portable loop (level avx2). GOP/s of multiply-adds ×2, and the ratio to the bf16 roof.
void BM_grouped_int8(benchmark::State& state) {
  using namespace moe::detail;
  const int64_t E = state.range(0), rows = state.range(1), N = state.range(2), K = state.range(3);
  const int64_t kernel = state.range(4);
  if (kernel == 3 && !amx_hardware()) return state.SkipWithError("no AMX on this CPU");
  if (kernel == 2 && !(cpu().has.avx512_vnni && isa_at_least(Isa::avx512)))
    return state.SkipWithError("no AVX512-VNNI on this CPU");
  const Isa level = kernel == 2 ? Isa::avx512 : kernel == 4 ? Isa::avx2 : cpu().level;
  IsaOverride pick(level, false);
  Int8Stack W;
  W.resize(E, K, N);
  std::vector<float> Wf(static_cast<size_t>(K * N)), x(static_cast<size_t>(E * rows * K));
  uint32_t seed = 777;
  auto next = [&] {
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
  };
  for (int64_t e = 0; e < E; ++e) {
    for (auto& v : Wf) v = next();
    W.assign(e, Wf.data());
  }
  for (auto& v : x) v = next();
  const int64_t lda = W.K4 * 4;
  std::vector<uint8_t> A(static_cast<size_t>(E * rows * lda));
  std::vector<float> scale(static_cast<size_t>(E * rows)), C(static_cast<size_t>(E * rows * N));
  quantize_rows_u8(A.data(), lda, scale.data(), x.data(), K, E * rows, K);
  for (auto _ : state) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e)
      gemm_u8s8_expert(C.data() + e * rows * N, N, A.data() + e * rows * lda, lda,
                       scale.data() + e * rows, rows, W, e);
    benchmark::DoNotOptimize(C.data());
  }
  set_rate(state, E * rows, N, K);
  state.counters["roof_ratio"] = benchmark::Counter(
      2.0 * static_cast<double>(E * rows) * static_cast<double>(N) * static_cast<double>(K) *
          static_cast<double>(state.iterations()) / 1e9 / bf16_roof_gflops(),
      benchmark::Counter::kIsRate);
  state.SetLabel(int8_kernel_name());
}
BENCHMARK(BM_grouped_int8)
    ->ArgNames({"E", "rows", "N", "K", "kernel"})
    ->ArgsProduct({{128}, {32}, {768}, {2048}, {1, 2, 3, 4}})   // Qwen3-30B-A3B W1 / W3
    ->ArgsProduct({{2}, {128}, {14336}, {4096}, {1, 2, 3}})     // Mixtral-8x7B W1, two experts
    ->ArgsProduct({{2}, {1}, {14336}, {4096}, {1, 2, 3}})       // decode
    ->UseRealTime();

// The alternative to the packed kernel that docs/design.md weighs: oneDNN's matmul created
// for a fixed row count (a bucket the experts' rows would be padded to), its weights given in
// the packed bytes' own format BA16a64b2a, one primitive for all experts, each expert one
// execution on one thread.
void BM_grouped_bf16_dnnl_fixed(benchmark::State& state) {
  const int64_t E = state.range(0), rows = state.range(1), N = state.range(2), K = state.range(3);
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  const dnnl::memory::desc a({rows, K}, dt::bf16, tag::ab), b({K, N}, dt::bf16, tag::BA16a64b2a),
      c({rows, N}, dt::f32, tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), eng);
  state.SetLabel(pd.impl_info_str());
  const dnnl::matmul mm(pd);
  std::vector<uint16_t> A(static_cast<size_t>(E * rows * K), moe::detail::to_bf16(0.01f));
  const int64_t wsize = moe::detail::packed_bf16_size(K, N);
  std::vector<uint16_t> W(static_cast<size_t>(E * wsize), moe::detail::to_bf16(0.02f));
  std::vector<float> C(static_cast<size_t>(E * rows * N));
  for (auto _ : state) {
#pragma omp parallel
    {
      dnnl::stream st(eng);
#pragma omp for schedule(dynamic, 1)
      for (int64_t e = 0; e < E; ++e) {
        dnnl::memory am(a, eng, A.data() + e * rows * K), bm(b, eng, W.data() + e * wsize),
            cm(c, eng, C.data() + e * rows * N);
        mm.execute(st, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
        st.wait();
      }
    }
    benchmark::DoNotOptimize(C.data());
  }
  set_rate(state, E * rows, N, K);
}
BENCHMARK(BM_grouped_bf16_dnnl_fixed)
    ->ArgNames({"E", "rows", "N", "K"})
    ->Args({128, 32, 768, 2048})
    ->Args({128, 32, 2048, 768})
    ->Args({16, 512, 2048, 1024})
    ->UseRealTime();

// What a change of the weights costs in bf16 (once per optimizer step): one expert's (K, N)
// fp32 matrix packed for the forward (transposed = 0) or as its transpose for backward (1),
// against the plain row-major conversions the layer made before the packed layout (mode 2:
// to_bf16_n; 3: to_bf16_transposed). GB/s of fp32 read.
void BM_pack_bf16(benchmark::State& state) {
  const int64_t K = state.range(0), N = state.range(1), mode = state.range(2);
  std::vector<float> W(static_cast<size_t>(K * N));
  for (size_t i = 0; i < W.size(); ++i) W[i] = static_cast<float>(i % 251) / 251.0f - 0.5f;
  std::vector<uint16_t> P(static_cast<size_t>(moe::detail::packed_bf16_size(K, N) + K * N));
  for (auto _ : state) {
    if (mode == 0) moe::detail::pack_bf16(P.data(), W.data(), N, 1, K, N);
    if (mode == 1) moe::detail::pack_bf16(P.data(), W.data(), 1, K, N, K);
    if (mode == 2) moe::detail::to_bf16_n(P.data(), W.data(), K * N);
    if (mode == 3) moe::detail::to_bf16_transposed(P.data(), K, W.data(), N, K, N);
    benchmark::DoNotOptimize(P.data());
  }
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(K * N * 4) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_pack_bf16)
    ->ArgNames({"K", "N", "mode"})
    ->ArgsProduct({{1024}, {2048}, {0, 1, 2, 3}})
    ->UseRealTime();

// The memory roof: one pass of the streaming read kernel over a buffer of range(0) MiB.
void BM_read_bandwidth(benchmark::State& state) {
  const int64_t n = state.range(0) * (int64_t{1} << 20) / static_cast<int64_t>(sizeof(float));
  std::vector<float> buf(static_cast<size_t>(n), 1.0f);
  for (auto _ : state) benchmark::DoNotOptimize(moe::perf::stream_read_sum(buf.data(), n));
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(n) * sizeof(float) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_read_bandwidth)->ArgName("MiB")->Arg(16)->Arg(1024)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
