// Decode (and prefill) of the low-bit formats (src/quant/) at their byte roof: GB/s of stored
// bytes read (codes + scales + zero points) for M = 1, 4, 16 rows (and 64, where prefill
// takes over), beside the read roof
// measured in the same run just before each entry with the same OpenMP threads, over cold
// slices of the entry's own batch size (the best of three read patterns: perf's
// stream_read_sum, an AVX-512 loop of four 64-byte loads per step, and the same fetching
// 8 KiB ahead into L2 as the kernels do), and the existing bf16 packed kernel on the same
// shape. Cold: each iteration
// reads the next batch of a rotation of distinct matrices whose bytes exceed the last-level
// cache eight times (256 MiB at least; the LLC size is printed), so no weight is in cache
// when it is read.
//
// One iteration = one MoE decode's worth of one projection: kBatch distinct experts' matrices
// (K 2048 × N 768, Qwen3-30B-A3B's W1), M rows each, one OpenMP region over (matrix, 64-column
// tile) tasks. Counters: GB/s (the median iteration), GB/s_best and us_best (the fastest
// iteration: its rate and its time for the kBatch matrices), roof_GB/s (the best read of a
// slice that size), of_roof = GB/s_best ÷ roof_GB/s, and MB per matrix. On a shared machine the
// median drifts with the neighbours' load; the best iteration and the best read pass are the
// figures that compare (docs/quant.md).
//
//   OMP_NUM_THREADS=2 build/bin/bench_quant                      (everything, a few minutes)
//   OMP_NUM_THREADS=2 build/bin/bench_quant --benchmark_filter='decode/M:1/'
//
// The *_tiled entries read the tiled layout the layer holds where the decode path is
// avx512_vnni (quant/quant_matrix.hpp); the others the column layout as files store it.
#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "perf/roofline.hpp"
#include "quant/fp8.hpp"
#include "quant/int4.hpp"
#include "quant/kernels.hpp"
#include "quant/mxfp4.hpp"

// GCC 12's AVX-512 reduce intrinsics pass an undefined merge source, which its
// -W(maybe-)uninitialized reports inside its own header (as in common/philox.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

using namespace moe::detail;

constexpr int64_t kK = 2048, kN = 768, kBatch = 8;
int64_t g_llc = 0;

// The last-level cache as Linux describes it (sysconf's figure is the hypervisor's guess on
// some VMs: 320 MiB on a machine whose /sys says 32 MiB).
int64_t llc_bytes() {
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream size(dir + "size");
    std::string text;
    if (!(size >> text)) break;
    int64_t v = std::atoll(text.c_str());
    if (!text.empty() && (text.back() == 'K' || text.back() == 'k')) v <<= 10;
    if (!text.empty() && text.back() == 'M') v <<= 20;
    best = std::max(best, v);
  }
  return best > 0 ? best : sysconf(_SC_LEVEL3_CACHE_SIZE);
}
// The rotation's total: 8 × the LLC, at least 256 MiB.
int64_t rotation_bytes() { return std::max<int64_t>(8 * g_llc, int64_t{256} << 20); }

uint64_t g_seed = 0x9e3779b97f4a7c15ull;
uint8_t next_byte() {
  g_seed ^= g_seed << 13;
  g_seed ^= g_seed >> 7;
  g_seed ^= g_seed << 17;
  return static_cast<uint8_t>(g_seed >> 32);
}

// A format's copies: one owning buffer per matrix (distinct pages), random codes.
struct Format {
  std::string label;
  QuantFormatId id = QuantFormatId::int4;
  int64_t group = 128;
  bool zero_points = false;
  bool bf16 = false;  // the existing packed bf16 kernel instead
  bool tiled = false;  // the layout the layer holds where the decode path is avx512_vnni
};

struct Copies {
  std::vector<Int4Kernel::Weights> i4;
  std::vector<Mxfp4Kernel::Weights> mx;
  std::vector<Fp8Kernel::Weights> f8;
  std::vector<std::vector<uint16_t>> b16;
  std::vector<QuantMatrix> views;
  std::vector<QuantStorage> tiles;  // the tiled copies' bytes (Format::tiled)
  int64_t bytes_each = 0;
  int64_t count() const { return static_cast<int64_t>(b16.empty() ? views.size() : b16.size()); }
};

Copies make_copies(const Format& f) {
  Copies c;
  if (f.bf16) {
    c.bytes_each = packed_bf16_size(kK, kN) * 2;
    const int64_t n = (rotation_bytes() + c.bytes_each - 1) / c.bytes_each;
    c.b16.resize(static_cast<size_t>(n));
    for (auto& w : c.b16) {
      w.resize(static_cast<size_t>(packed_bf16_size(kK, kN)));
      for (auto& v : w) v = to_bf16((static_cast<float>(next_byte()) - 128.0f) / 4096.0f);
    }
    return c;
  }
  QuantMatrix probe;
  switch (f.id) {
    case QuantFormatId::int4: {
      Int4Kernel::Weights w;
      w.resize(kK, kN, f.group, f.zero_points);
      probe = w.view();
      break;
    }
    case QuantFormatId::mxfp4: probe = Mxfp4Kernel::view(nullptr, nullptr, kK, kN); break;
    case QuantFormatId::fp8: probe = Fp8Kernel::view(nullptr, kK, nullptr, kK, kN); break;
  }
  c.bytes_each = probe.stored_bytes();
  const int64_t n = (rotation_bytes() + c.bytes_each - 1) / c.bytes_each;
  for (int64_t i = 0; i < n; ++i) {
    switch (f.id) {
      case QuantFormatId::int4: {
        Int4Kernel::Weights& w = c.i4.emplace_back();
        w.resize(kK, kN, f.group, f.zero_points);
        for (auto& b : w.codes) b = next_byte();
        for (auto& s : w.scales) s = f32_to_f16((static_cast<float>(next_byte()) + 1.0f) / 65536.0f);
        for (auto& z : w.zeros) z = next_byte() & 15;
        break;
      }
      case QuantFormatId::mxfp4: {
        Mxfp4Kernel::Weights& w = c.mx.emplace_back();
        w.resize(kK, kN);
        for (auto& b : w.blocks) b = next_byte();
        for (auto& s : w.scales) s = static_cast<uint8_t>(115 + (next_byte() & 7));
        break;
      }
      case QuantFormatId::fp8: {
        Fp8Kernel::Weights& w = c.f8.emplace_back();
        w.resize(kK, kN);
        for (auto& b : w.weight) b = next_byte() & 0xf7;  // no NaN codes
        for (auto& s : w.scale_inv) s = 1e-3f * static_cast<float>(1 + (next_byte() & 15));
        break;
      }
    }
  }
  for (auto& w : c.i4) c.views.push_back(w.view());
  for (auto& w : c.mx) c.views.push_back(w.view());
  for (auto& w : c.f8) c.views.push_back(w.view());
  if (f.tiled) {  // the same bytes in tiles of 16 columns; the column copies are dropped
    c.tiles.resize(c.views.size());
    for (size_t i = 0; i < c.views.size(); ++i) c.views[i] = quant_tiled(c.views[i], c.tiles[i]);
    c.i4.clear();
    c.mx.clear();
  }
  return c;
}

enum class Method { decode, prefill };

// A read pass with four independent 64-byte loads per step, fixed 64 KiB chunks over the
// threads.
__attribute__((target("avx512f"))) double read_pass_avx512(const float* p, int64_t n) {
  constexpr int64_t kChunk = int64_t{1} << 14;  // floats: 64 KiB, a kernel task's bytes
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = lo; i + 64 <= hi; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
  return total;
}

// The same with each thread's next lines fetched into L2 8 KiB ahead (what the kernels do).
__attribute__((target("avx512f"))) double read_pass_prefetch(const float* p, int64_t n) {
  constexpr int64_t kChunk = int64_t{1} << 14, kAhead = 2048;  // floats
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = lo; i + 64 <= hi; i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead + 16), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead + 32), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead + 48), _MM_HINT_T1);
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
  return total;
}

// The read roof now, at the grain of a kernel's iteration: `slices` consecutive slices of
// `bytes` each (cold: they rotate through a rotation-sized buffer) read by each of the three
// patterns with the same threads; the best slice's rate. Short slices and long passes meet
// a shared machine's neighbours differently, so the roof is timed as the kernels are.
double read_roof_gbs(int64_t bytes, int slices) {
  static std::vector<float> buf = [] {
    std::vector<float> b(static_cast<size_t>(rotation_bytes() / 4));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < static_cast<int64_t>(b.size()); ++i) b[i] = 1.0f;
    return b;
  }();
  static int64_t pos = 0;
  static volatile double sink = 0.0;
  const int64_t n = std::min<int64_t>(bytes / 4, static_cast<int64_t>(buf.size()));
  double best = 1e30;
  for (int i = 0; i < slices; ++i)
    for (int pattern = 0; pattern < 3; ++pattern) {
      if (pos + n > static_cast<int64_t>(buf.size())) pos = 0;
      const float* p = buf.data() + pos;
      pos += n;
      const auto t0 = std::chrono::steady_clock::now();
      sink = sink + (pattern == 0   ? moe::perf::stream_read_sum(p, n)
                     : pattern == 1 ? read_pass_avx512(p, n)
                                    : read_pass_prefetch(p, n));
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  return static_cast<double>(n * 4) / best / 1e9;
}

void report(benchmark::State& state, std::vector<double> times, int64_t bytes_per_iter,
            int64_t bytes_each, double roof) {
  std::sort(times.begin(), times.end());
  const double b = static_cast<double>(bytes_per_iter);
  state.counters["GB/s"] = b / times[times.size() / 2] / 1e9;
  state.counters["GB/s_best"] = b / times.front() / 1e9;
  state.counters["roof_GB/s"] = roof;
  state.counters["of_roof"] = b / times.front() / 1e9 / roof;
  state.counters["MB_each"] = static_cast<double>(bytes_each) / 1e6;
  state.counters["us_best"] = times.front() * 1e6;
}

void BM_quant(benchmark::State& state, Format f, Method method, QuantPath path, int64_t M) {
  if (!quant_path_allowed(path)) {
    state.SkipWithError("path not allowed on this CPU");
    return;
  }
  // Google Benchmark calls this several times per entry: the copies of the last format are
  // kept (one format's rotation in memory at a time).
  static std::string cached_label;
  static std::unique_ptr<Copies> cached;
  if (!cached || cached_label != f.label) {
    cached.reset();
    cached = std::make_unique<Copies>(make_copies(f));
    cached_label = f.label;
  }
  const Copies& c = *cached;
  const int64_t copies = c.count();
  std::vector<float> X(static_cast<size_t>(M * kK));
  for (auto& x : X) x = (static_cast<float>(next_byte()) - 128.0f) / 128.0f;
  std::vector<float> C(static_cast<size_t>(kBatch * M * kN));
  const int64_t tiles = (kN + kQuantTileN - 1) / kQuantTileN;
  const int threads = omp_get_max_threads();
  std::vector<uint16_t> A16(static_cast<size_t>(M * kK));
  for (size_t i = 0; i < A16.size(); ++i) A16[i] = to_bf16(X[i]);
  std::vector<unsigned char> rows_buf;
  std::vector<uint16_t> panels;
  if (!f.bf16) {
    rows_buf.resize(static_cast<size_t>(quant_rows_bytes(
        c.views[0], path, method == Method::decode ? QuantMethod::decode : QuantMethod::prefill,
        M)));
    panels.resize(static_cast<size_t>(quant_prefill_workspace_size(c.views[0]) * threads));
  }
  const int64_t panel = f.bf16 ? 0 : quant_prefill_workspace_size(c.views[0]);
  const double roof = read_roof_gbs(kBatch * c.bytes_each, 40);
  // The rotation goes on across Google Benchmark's calls of this entry (a call starting again
  // at the first batch would find it in the LLC, read by the previous call's first iteration).
  static int64_t next = 0;
  if (next >= copies - copies % kBatch) next = 0;
  std::vector<double> times;
  for (auto _ : state) {
    const int64_t first = next;
    next = (next + kBatch) % (copies - copies % kBatch);
    const auto t0 = std::chrono::steady_clock::now();
    if (f.bf16) {
#pragma omp parallel for schedule(static)
      for (int64_t task = 0; task < kBatch * tiles; ++task) {
        const int64_t b = task / tiles, n0 = (task % tiles) * kQuantTileN;
        gemm_bf16_packed_serial(M, n0, std::min(kQuantTileN, kN - n0), kK, A16.data(), kK,
                                c.b16[static_cast<size_t>(first + b)].data(), 0.0f,
                                C.data() + b * M * kN + n0, kN);
      }
    } else {
      // The rows are the same for every matrix of the batch (no act-order here): prepared once.
      const QuantRows rows = quant_prepare_rows(
          c.views[0], path, method == Method::decode ? QuantMethod::decode : QuantMethod::prefill,
          X.data(), kK, M, rows_buf.data());
#pragma omp parallel for schedule(static)
      for (int64_t task = 0; task < kBatch * tiles; ++task) {
        const int64_t b = task / tiles, n0 = (task % tiles) * kQuantTileN;
        const QuantMatrix& W = c.views[static_cast<size_t>(first + b)];
        float* out = C.data() + b * M * kN + n0;
        const int64_t n = std::min(kQuantTileN, kN - n0);
        if (method == Method::decode)
          quant_decode_serial(W, rows, n0, n, out, kN);
        else
          quant_prefill_serial(W, rows, path, n0, n, out, kN,
                               panels.data() + omp_get_thread_num() * panel);
      }
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(dt);
    times.push_back(dt);
    benchmark::DoNotOptimize(C.data());
  }
  report(state, times, kBatch * c.bytes_each, c.bytes_each, roof);
  state.SetLabel(f.bf16 ? std::string(gemm_bf16_packed_impl()) : quant_kernel_name(c.views[0], path));
}

// The roof alone, over slices of one int4 batch's size (kBatch matrices of int4 g128).
void BM_read_roof(benchmark::State& state) {
  const int64_t bytes = state.range(0) << 20;
  std::vector<double> times;
  for (auto _ : state) {
    const double dt = static_cast<double>(bytes) / read_roof_gbs(bytes, 1) / 1e9;
    state.SetIterationTime(dt);
    times.push_back(dt);
  }
  report(state, times, bytes, bytes, read_roof_gbs(bytes, 40));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  g_llc = llc_bytes();
  std::printf("threads %d, LLC %.1f MiB, rotation %.0f MiB per format, read roof %.2f GB/s "
              "(best 8 MiB slice of three patterns), best path %s\n",
              omp_get_max_threads(), static_cast<double>(g_llc) / (1 << 20),
              static_cast<double>(rotation_bytes()) / (1 << 20), read_roof_gbs(8 << 20, 40),
              quant_path_name(quant_best_path()));
  const Format formats[] = {
      {"int4_g32_sym", QuantFormatId::int4, 32, false, false},
      {"int4_g64_sym", QuantFormatId::int4, 64, false, false},
      {"int4_g128_sym", QuantFormatId::int4, 128, false, false},
      {"int4_g128_zp", QuantFormatId::int4, 128, true, false},
      {"mxfp4", QuantFormatId::mxfp4, 0, false, false},
      {"fp8", QuantFormatId::fp8, 0, false, false},
      // What the layer holds where the decode path is avx512_vnni (docs/quant.md, "Layouts"):
      // the tiled kernel at decode, the column copy's at prefill.
      {"int4_g32_sym_tiled", QuantFormatId::int4, 32, false, false, true},
      {"int4_g128_sym_tiled", QuantFormatId::int4, 128, false, false, true},
      {"int4_g128_zp_tiled", QuantFormatId::int4, 128, true, false, true},
      {"mxfp4_tiled", QuantFormatId::mxfp4, 0, false, false, true},
  };
  benchmark::RegisterBenchmark("read_roof", BM_read_roof)->Arg(8)->Arg(32)->UseManualTime()->MinTime(0.5);
  // M 1, 4, 16 on every path; M 32 and 64 (where prefill takes over) on the fastest ones.
  for (const int64_t M : {1, 4, 8, 16, 32, 64}) {
    for (const Format& f : formats) {
      for (const QuantPath p : {QuantPath::avx512_vnni, QuantPath::avx512_bf16, QuantPath::avx512,
                                QuantPath::avx2}) {
        if (!quant_path_supports(p, f.id)) continue;
        if (M >= 32 && p != quant_decode_path(f.id)) continue;
        if (f.tiled && (p != QuantPath::avx512_vnni || !quant_path_allowed(p))) continue;
        benchmark::RegisterBenchmark(
            (f.label + "/decode/M:" + std::to_string(M) + "/" + quant_path_name(p)).c_str(),
            [=](benchmark::State& s) { BM_quant(s, f, Method::decode, p, M); })
            ->UseManualTime()->MinTime(0.5);
      }
      if (M < 4) continue;
      // Prefill on both of its paths: bf16 panels (vdpbf16ps, or AMX tiles on an AMX CPU) and,
      // for 4-bit codes, int8 panels (vpdpbusd).
      for (const QuantPath p : {QuantPath::avx512_bf16, QuantPath::avx512_vnni}) {
        if (!quant_path_supports(p, f.id)) continue;
        if (f.tiled && (p != QuantPath::avx512_vnni || !quant_path_allowed(p))) continue;
        benchmark::RegisterBenchmark(
            (f.label + "/prefill/M:" + std::to_string(M) + "/" + quant_path_name(p)).c_str(),
            [=](benchmark::State& s) { BM_quant(s, f, Method::prefill, p, M); })
            ->UseManualTime()->MinTime(0.5);
      }
    }
    const Format bf16{"bf16_packed", QuantFormatId::int4, 0, false, true};
    benchmark::RegisterBenchmark(("bf16_packed/M:" + std::to_string(M)).c_str(),
                                 [=](benchmark::State& s) {
                                   BM_quant(s, bf16, Method::decode, QuantPath::avx512_bf16, M);
                                 })
        ->UseManualTime()->MinTime(0.5);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
