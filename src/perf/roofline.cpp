#include "perf/roofline.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/gemm.hpp"

namespace moe::perf {

namespace {

// Values in [-1, 1) from a cheap integer hash: no denormals, no zeros that a kernel might
// skip, and the same contents every run.
void fill_pattern(std::vector<float>& v, uint32_t salt) {
  for (size_t i = 0; i < v.size(); ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ salt;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    v[i] = static_cast<float>(h & 0xFFFFu) / 32768.0f - 1.0f;
  }
}

GemmRate measure_gemm(int64_t M, int64_t N, int64_t K, int repeat, bool blocked) {
  MOE_REQUIRE(M > 0 && N > 0 && K > 0, "gemm shape: must be positive, got ", M, "x", N, "x", K);
  std::vector<float> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(K * N)),
      C(static_cast<size_t>(M * N), 0.0f);
  fill_pattern(A, 1u);
  fill_pattern(B, 2u);
  auto run = [&] {
    if (blocked) {
      detail::gemm_f32(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, C.data(), N);
    } else {
      const dnnl_status_t st = dnnl_sgemm('N', 'N', M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f,
                                          C.data(), N);
      MOE_ASSERT(st == dnnl_success);
    }
  };
  GemmRate r;
  r.seconds = time_median(run, 1, std::max(repeat, 1));
  r.gflops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) /
             r.seconds / 1e9;
  return r;
}

}  // namespace

SgemmRoof::SgemmRoof(int64_t M, int64_t N, int64_t K)
    : M_(M), N_(N), K_(K), A_(static_cast<size_t>(M * K)), B_(static_cast<size_t>(K * N)),
      C_(static_cast<size_t>(M * N), 0.0f) {
  MOE_REQUIRE(M > 0 && N > 0 && K > 0, "gemm shape: must be positive, got ", M, "x", N, "x", K);
  fill_pattern(A_, 1u);
  fill_pattern(B_, 2u);
}

double SgemmRoof::run_s() {
  const double t0 = now_s();
  const dnnl_status_t st = dnnl_sgemm('N', 'N', M_, N_, K_, 1.0f, A_.data(), K_, B_.data(), N_,
                                      0.0f, C_.data(), N_);
  const double t = now_s() - t0;
  MOE_ASSERT(st == dnnl_success);
  return t;
}

struct Bf16Roof::State {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{eng};
  dnnl::matmul mm;
  dnnl::memory a, b, c;
};

Bf16Roof::Bf16Roof(int64_t M, int64_t N, int64_t K)
    : M_(M), N_(N), K_(K), s_(std::make_unique<State>()) {
  MOE_REQUIRE(M > 0 && N > 0 && K > 0, "gemm shape: must be positive, got ", M, "x", N, "x", K);
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  State& s = *s_;
  const dnnl::memory::desc ad({M, K}, dt::bf16, tag::ab), bd({K, N}, dt::bf16, tag::any),
      cd({M, N}, dt::f32, tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(ad, bd, cd), s.eng);
  impl_ = pd.impl_info_str();
  s.mm = dnnl::matmul(pd);
  std::vector<float> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(K * N));
  fill_pattern(A, 1u);
  fill_pattern(B, 2u);
  s.a = dnnl::memory(ad, s.eng);
  detail::to_bf16_n(static_cast<uint16_t*>(s.a.get_data_handle()), A.data(), M * K);
  std::vector<uint16_t> Bb(static_cast<size_t>(K * N));
  detail::to_bf16_n(Bb.data(), B.data(), K * N);
  dnnl::memory b_plain({{K, N}, dt::bf16, tag::ab}, s.eng, Bb.data());
  s.b = dnnl::memory(pd.weights_desc(), s.eng);
  dnnl::reorder(b_plain, s.b).execute(s.stream, b_plain, s.b);
  s.c = dnnl::memory(cd, s.eng);
  s.stream.wait();
}

Bf16Roof::~Bf16Roof() = default;

double Bf16Roof::run_s() {
  State& s = *s_;
  const double t0 = now_s();
  s.mm.execute(s.stream, {{DNNL_ARG_SRC, s.a}, {DNNL_ARG_WEIGHTS, s.b}, {DNNL_ARG_DST, s.c}});
  s.stream.wait();
  return now_s() - t0;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double median(std::vector<double> s) {
  if (s.empty()) return 0.0;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

double time_median(const std::function<void()>& fn, int warmup, int repeat) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> s;
  for (int i = 0; i < repeat; ++i) {
    const double t0 = now_s();
    fn();
    s.push_back(now_s() - t0);
  }
  return median(std::move(s));
}

GemmRate measure_sgemm_dnnl(int64_t M, int64_t N, int64_t K, int repeat) {
  return measure_gemm(M, N, K, repeat, false);
}

GemmRate measure_sgemm_blocked(int64_t M, int64_t N, int64_t K, int repeat) {
  return measure_gemm(M, N, K, repeat, true);
}

double stream_read_sum(const float* p, int64_t n) {
  // Chunks are a fixed size (a multiple of the 16-lane step), not n / threads, so the sum
  // is the same whatever the thread count.
  constexpr int64_t kChunk = int64_t{1} << 18;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(n_chunks, 1)), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    float acc[16] = {};
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16)
      for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
    double s = 0.0;
    for (; i < hi; ++i) s += p[i];
    for (float a : acc) s += a;
    partial[static_cast<size_t>(c)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

ReadRoof::ReadRoof(int64_t bytes) : n_(bytes / static_cast<int64_t>(sizeof(float))) {
  MOE_REQUIRE(bytes >= 4, "bandwidth buffer: must hold at least one float, got ", bytes, " bytes");
  // Uninitialised storage, first touched in parallel with the reading threads' own chunks so
  // that the pages sit where the readers are.
  buf_.reset(new float[static_cast<size_t>(n_)]);
  constexpr int64_t kChunk = int64_t{1} << 18;
  float* buf = buf_.get();
  const int64_t n = n_;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t i = lo; i < hi; ++i) buf[i] = 1.0f / static_cast<float>(1 + (i & 1023));
  }
}

double ReadRoof::run_s() {
  static volatile double sink = 0.0;
  const double t0 = now_s();
  sink = sink + stream_read_sum(buf_.get(), n_);
  return now_s() - t0;
}

Bandwidth measure_read_bandwidth(int64_t bytes, int repeat) {
  ReadRoof roof(bytes);
  Bandwidth b;
  b.bytes = roof.bytes();
  b.seconds = time_median([&] { roof.run_s(); }, 1, std::max(repeat, 1));
  b.bytes_per_s = static_cast<double>(b.bytes) / b.seconds;
  return b;
}

}  // namespace moe::perf
