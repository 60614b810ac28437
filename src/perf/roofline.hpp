// The two references every libmoe benchmark figure is set beside, measured in the same run:
// the compute roof — oneDNN's sgemm rate on one dense GEMM — and the memory roof —
// the read bandwidth of a streaming kernel. Plus the small timing helpers they share.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <functional>
#include <vector>

namespace moe::perf {

// Seconds on a monotonic clock.
double now_s();

// Median of the samples (mean of the two middle ones for an even count); 0 for none.
double median(std::vector<double> samples);

// Runs fn `warmup` times untimed, then `repeat` times timed; returns the median seconds.
double time_median(const std::function<void()>& fn, int warmup, int repeat);

// Dense GEMM C (M, N) = A (M, K) · B (K, N), row-major, FLOPs = 2·M·N·K.
struct GemmRate {
  double gflops = 0.0;   // 2·M·N·K / seconds / 1e9
  double seconds = 0.0;  // median of the repeats
};

// The roof GEMM with its buffers kept, so that it can be timed again between the layer's
// calls: the machine's rate drifts (±20% over seconds on a shared VM), and a roof measured
// once before the layer puts that drift into every ratio. Pairing each layer sample with a
// roof sample taken right before it cancels most of it.
class SgemmRoof {
 public:
  // A (M, K) · B (K, N) in fp32 through dnnl_sgemm, threaded by oneDNN itself.
  SgemmRoof(int64_t M, int64_t N, int64_t K);
  double run_s();  // one timed call, seconds
  double flops() const {
    return 2.0 * static_cast<double>(M_) * static_cast<double>(N_) * static_cast<double>(K_);
  }

 private:
  int64_t M_, N_, K_;
  std::vector<float> A_, B_, C_;
};

// The bf16 compute roof (precision bf16): oneDNN's matmul on bf16 operands with an fp32
// result, A (M, K) · B (K, N), both random, the weights in the layout oneDNN prefers for them
// (format_tag::any, reordered once), threaded by oneDNN itself: the best bf16 rate a caller
// gets from the library on this machine. impl() names the kernel it chose, which says the
// ISA ("brg:avx512_core_bf16", "brg:avx512_core_amx_bf16", ...).
class Bf16Roof {
 public:
  Bf16Roof(int64_t M, int64_t N, int64_t K);
  ~Bf16Roof();
  double run_s();
  double flops() const {
    return 2.0 * static_cast<double>(M_) * static_cast<double>(N_) * static_cast<double>(K_);
  }
  const std::string& impl() const { return impl_; }

 private:
  struct State;
  int64_t M_, N_, K_;
  std::unique_ptr<State> s_;
  std::string impl_;
};

// The compute roof: dnnl_sgemm called once on the whole problem, oneDNN threading it itself
// over the current OpenMP thread count — the best rate a caller gets from the library.
GemmRate measure_sgemm_dnnl(int64_t M, int64_t N, int64_t K, int repeat);

// The same GEMM through libmoe's deterministic wrapper detail::gemm_f32 (fixed row or
// column blocks, serial sgemm per block): what the layer's own GEMMs can reach.
GemmRate measure_sgemm_blocked(int64_t M, int64_t N, int64_t K, int repeat);

// Sum of n floats with 16 independent accumulators so that the loop vectorises without
// reassociation; OpenMP threads take fixed contiguous chunks and the partial sums are
// added in chunk order. Returned so that the read cannot be optimised away (and tested).
double stream_read_sum(const float* p, int64_t n);

struct Bandwidth {
  double bytes_per_s = 0.0;
  double seconds = 0.0;  // median seconds for one pass over the buffer
  int64_t bytes = 0;
};

// One way of reading memory for the read roof. A single plain stream per thread can read well
// below what the memory delivers (on an AMX Xeon a 2-thread sum read 21 GB/s where libmoe's
// int8 kernel streamed its weights at 30 GB/s), so the roof is the best of several.
struct ReadPattern {
  enum class Load { plain, nontemporal, prefetch };
  int threads = 1;  // OpenMP threads, each reading one contiguous part of the buffer
  int streams = 1;  // independent sequential streams per thread (its part split in as many)
  Load load = Load::plain;  // nontemporal: vmovntdqa (streaming) loads; prefetch: software
                            // prefetch kReadPrefetchBytes ahead of each stream
  std::string name() const;  // "2 threads x 4 streams, non-temporal loads"
};
constexpr int64_t kReadPrefetchBytes = 2048;

struct ReadPatternResult {
  ReadPattern pattern;
  double bytes_per_s = 0.0;  // best of the passes timed
};

// The patterns the roof tries: 1 and max_threads threads (once when max_threads <= 1), 1 and 4
// streams per thread, plain, non-temporal and prefetched loads.
std::vector<ReadPattern> read_patterns(int max_threads);

// Reads every 32-bit word of [p, p + bytes) with the pattern (AVX-512, AVX2 or scalar loads,
// as the CPU has them) and returns their sum modulo 2^32: the same value for every pattern and
// thread count (the tests check it), so the read cannot be optimised away. bytes % 4 == 0.
uint32_t read_pattern_sum(const void* p, int64_t bytes, const ReadPattern& pattern);

// Index of the fastest result (the first of equals); results must not be empty.
size_t best_read_pattern(const std::vector<ReadPatternResult>& results);

// The memory roof, re-measurable: a buffer of `bytes` (far beyond the last-level cache),
// 64-byte aligned, first touched in parallel by the threads that will read it. calibrate()
// times every read_patterns() pattern over it and keeps the fastest; run_s() times one pass
// with the kept pattern (before calibrate(): max threads, one plain stream each).
class ReadRoof {
 public:
  explicit ReadRoof(int64_t bytes);
  ~ReadRoof();
  ReadRoof(const ReadRoof&) = delete;
  ReadRoof& operator=(const ReadRoof&) = delete;
  // passes: timed passes per pattern, the best kept. Returns every pattern's result.
  const std::vector<ReadPatternResult>& calibrate(int passes = 2);
  double run_s();
  int64_t bytes() const { return n_ * static_cast<int64_t>(sizeof(float)); }
  const ReadPattern& pattern() const { return pattern_; }
  const std::vector<ReadPatternResult>& results() const { return results_; }

 private:
  int64_t n_;
  float* buf_ = nullptr;
  ReadPattern pattern_;
  std::vector<ReadPatternResult> results_;
};

// The memory roof measured once: median of `repeat` ReadRoof passes after one warm-up.
Bandwidth measure_read_bandwidth(int64_t bytes, int repeat);

}  // namespace moe::perf
