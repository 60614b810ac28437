// The two references every libmoe benchmark figure is set beside, measured in the same run
// (issue 5): the compute roof — oneDNN's sgemm rate on one dense GEMM — and the memory roof —
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

// The memory roof, re-measurable: a buffer of `bytes` (far beyond the last-level cache),
// first touched in parallel by the threads that will read it; run_s() times one
// stream_read_sum pass over it (the first call also warms it up).
class ReadRoof {
 public:
  explicit ReadRoof(int64_t bytes);
  double run_s();
  int64_t bytes() const { return n_ * static_cast<int64_t>(sizeof(float)); }

 private:
  int64_t n_;
  std::unique_ptr<float[]> buf_;
};

// The memory roof measured once: median of `repeat` ReadRoof passes after one warm-up.
Bandwidth measure_read_bandwidth(int64_t bytes, int repeat);

}  // namespace moe::perf
