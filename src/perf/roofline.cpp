#include "perf/roofline.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/cpu.hpp"
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
  detail::check_cpu_settings();  // MOE_MAX_ISA caps oneDNN before its first use
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
  detail::check_cpu_settings();  // MOE_MAX_ISA caps oneDNN before its first use
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
    : M_(M), N_(N), K_(K),
      s_((detail::check_cpu_settings(), std::make_unique<State>())) {  // MOE_MAX_ISA first
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

namespace {

using Load = ReadPattern::Load;

// One stream's 64-byte lines go into two accumulators (two lines per step) so that the adds of
// a single stream do not chain; S streams advance in lockstep, each over its own contiguous
// part. Integer adds: the sum is exact whatever the order.
template <int S, Load L>
__attribute__((target("avx512f"))) uint32_t sum_lines_avx512(const char* p, int64_t lines) {
  const int64_t per = lines / S / 2 * 2;  // lines per stream, even
  __m512i acc[S][2];
  for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm512_setzero_si512();
  for (int64_t i = 0; i < per; i += 2) {
    for (int s = 0; s < S; ++s) {
      const char* q = p + (s * per + i) * 64;
      if constexpr (L == Load::prefetch) _mm_prefetch(q + kReadPrefetchBytes, _MM_HINT_T0);
      __m512i a, b;
      if constexpr (L == Load::nontemporal) {
        a = _mm512_stream_load_si512(const_cast<char*>(q));
        b = _mm512_stream_load_si512(const_cast<char*>(q + 64));
      } else {
        a = _mm512_load_si512(q);
        b = _mm512_load_si512(q + 64);
      }
      acc[s][0] = _mm512_add_epi32(acc[s][0], a);
      acc[s][1] = _mm512_add_epi32(acc[s][1], b);
    }
  }
  __m512i t = _mm512_setzero_si512();
  for (int s = 0; s < S; ++s) t = _mm512_add_epi32(t, _mm512_add_epi32(acc[s][0], acc[s][1]));
  for (int64_t i = S * per; i < lines; ++i)
    t = _mm512_add_epi32(t, _mm512_load_si512(p + i * 64));
  alignas(64) uint32_t lanes[16];  // (not _mm512_reduce_add_epi32: GCC 12 warns inside it)
  _mm512_store_si512(lanes, t);
  uint32_t r = 0;
  for (uint32_t v : lanes) r += v;
  return r;
}

template <int S, Load L>
__attribute__((target("avx2"))) uint32_t sum_lines_avx2(const char* p, int64_t lines) {
  const int64_t per = lines / S;
  __m256i acc[S][2];
  for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_si256();
  for (int64_t i = 0; i < per; ++i) {
    for (int s = 0; s < S; ++s) {
      const char* q = p + (s * per + i) * 64;
      if constexpr (L == Load::prefetch) _mm_prefetch(q + kReadPrefetchBytes, _MM_HINT_T0);
      __m256i a, b;
      if constexpr (L == Load::nontemporal) {
        a = _mm256_stream_load_si256(reinterpret_cast<const __m256i*>(q));
        b = _mm256_stream_load_si256(reinterpret_cast<const __m256i*>(q + 32));
      } else {
        a = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
        b = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32));
      }
      acc[s][0] = _mm256_add_epi32(acc[s][0], a);
      acc[s][1] = _mm256_add_epi32(acc[s][1], b);
    }
  }
  __m256i t = _mm256_setzero_si256();
  for (int s = 0; s < S; ++s) t = _mm256_add_epi32(t, _mm256_add_epi32(acc[s][0], acc[s][1]));
  for (int64_t i = S * per; i < lines; ++i) {
    t = _mm256_add_epi32(t, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i * 64)));
    t = _mm256_add_epi32(t, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i * 64 + 32)));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), t);
  uint32_t r = 0;
  for (uint32_t v : lanes) r += v;
  return r;
}

uint32_t sum_words(const char* p, int64_t bytes) {
  uint32_t r = 0;
  for (int64_t i = 0; i + 4 <= bytes; i += 4) {
    uint32_t w;
    std::memcpy(&w, p + i, 4);
    r += w;
  }
  return r;
}

using LinesFn = uint32_t (*)(const char*, int64_t);

template <int S>
LinesFn pick_lines(Load load) {
  // MOE_MAX_ISA=avx2 (the cap of issue 20's CPU-feature module) keeps the AVX-512 loads out, so
  // that the AVX2 kernels run, and are tested, on an AVX-512 machine too.
  const char* cap = std::getenv("MOE_MAX_ISA");
  const bool capped = cap && std::string(cap) == "avx2";
  const bool avx512 = !capped && __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx512) {
    switch (load) {
      case Load::plain: return sum_lines_avx512<S, Load::plain>;
      case Load::nontemporal: return sum_lines_avx512<S, Load::nontemporal>;
      case Load::prefetch: return sum_lines_avx512<S, Load::prefetch>;
    }
  }
  if (avx2) {
    switch (load) {
      case Load::plain: return sum_lines_avx2<S, Load::plain>;
      case Load::nontemporal: return sum_lines_avx2<S, Load::nontemporal>;
      case Load::prefetch: return sum_lines_avx2<S, Load::prefetch>;
    }
  }
  return nullptr;
}

LinesFn lines_fn(const ReadPattern& pat) {
  switch (pat.streams) {
    case 1: return pick_lines<1>(pat.load);
    case 2: return pick_lines<2>(pat.load);
    case 4: return pick_lines<4>(pat.load);
    case 8: return pick_lines<8>(pat.load);
    default: MOE_REQUIRE(false, "read pattern: streams must be 1, 2, 4 or 8, got ", pat.streams);
  }
  return nullptr;
}

}  // namespace

std::string ReadPattern::name() const {
  std::string s = std::to_string(threads) + (threads == 1 ? " thread x " : " threads x ") +
                  std::to_string(streams) + (streams == 1 ? " stream" : " streams");
  switch (load) {
    case Load::plain: return s + ", plain loads";
    case Load::nontemporal: return s + ", non-temporal loads";
    case Load::prefetch: return s + ", prefetch " + std::to_string(kReadPrefetchBytes) + " B ahead";
  }
  return s;
}

std::vector<ReadPattern> read_patterns(int max_threads) {
  std::vector<int> threads = {1};
  if (max_threads > 1) threads.push_back(max_threads);
  std::vector<ReadPattern> out;
  for (int t : threads)
    for (int s : {1, 4})
      for (Load l : {Load::plain, Load::nontemporal, Load::prefetch}) out.push_back({t, s, l});
  return out;
}

uint32_t read_pattern_sum(const void* p, int64_t bytes, const ReadPattern& pat) {
  MOE_REQUIRE(bytes >= 0 && bytes % 4 == 0, "read_pattern_sum: bytes must be a multiple of 4, got ",
              bytes);
  MOE_REQUIRE(pat.threads >= 1, "read pattern: threads must be >= 1, got ", pat.threads);
  const char* c = static_cast<const char*>(p);
  const LinesFn fn = lines_fn(pat);
  if (!fn) return sum_words(c, bytes);  // neither AVX2 nor AVX-512: plain words
  // Head to the first 64-byte boundary and the tail after the last whole line: word by word.
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(c) % 64) % 64);
  const char* body = c + head;
  const int64_t lines = (bytes - head) / 64;
  uint32_t total = sum_words(c, head) + sum_words(body + lines * 64, bytes - head - lines * 64);
  const int T = pat.threads;
  std::vector<uint32_t> part(static_cast<size_t>(T), 0u);
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = lines * t / nt, hi = lines * (t + 1) / nt;
    if (t < T) part[static_cast<size_t>(t)] = fn(body + lo * 64, hi - lo);
  }
  for (uint32_t v : part) total += v;
  return total;
}

size_t best_read_pattern(const std::vector<ReadPatternResult>& results) {
  MOE_REQUIRE(!results.empty(), "best_read_pattern: no results");
  size_t best = 0;
  for (size_t i = 1; i < results.size(); ++i)
    if (results[i].bytes_per_s > results[best].bytes_per_s) best = i;
  return best;
}

ReadRoof::ReadRoof(int64_t bytes) : n_(bytes / static_cast<int64_t>(sizeof(float))) {
  MOE_REQUIRE(bytes >= 4, "bandwidth buffer: must hold at least one float, got ", bytes, " bytes");
  // 64-byte aligned (streaming loads need it), uninitialised, first touched in parallel with
  // the reading threads' own chunks so that the pages sit where the readers are.
  const size_t alloc = (static_cast<size_t>(n_) * sizeof(float) + 63) / 64 * 64;
  buf_ = static_cast<float*>(std::aligned_alloc(64, alloc));
  MOE_REQUIRE(buf_ != nullptr, "bandwidth buffer: cannot allocate ", bytes, " bytes");
  constexpr int64_t kChunk = int64_t{1} << 18;
  float* buf = buf_;
  const int64_t n = n_;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t i = lo; i < hi; ++i) buf[i] = 1.0f / static_cast<float>(1 + (i & 1023));
  }
  pattern_.threads = omp_get_max_threads();
}

ReadRoof::~ReadRoof() { std::free(buf_); }

const std::vector<ReadPatternResult>& ReadRoof::calibrate(int passes) {
  static volatile uint32_t sink = 0;
  results_.clear();
  for (const ReadPattern& pat : read_patterns(omp_get_max_threads())) {
    double best = 0.0;
    for (int i = 0; i < std::max(passes, 1); ++i) {
      const double t0 = now_s();
      sink = sink + read_pattern_sum(buf_, bytes(), pat);
      const double t = now_s() - t0;
      if (best == 0.0 || t < best) best = t;
    }
    results_.push_back({pat, static_cast<double>(bytes()) / best});
  }
  pattern_ = results_[best_read_pattern(results_)].pattern;
  return results_;
}

double ReadRoof::run_s() {
  static volatile uint32_t sink = 0;
  const double t0 = now_s();
  sink = sink + read_pattern_sum(buf_, bytes(), pattern_);
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
