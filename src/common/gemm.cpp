#include "common/gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/cpu.hpp"

namespace moe::detail {

namespace {

// Block sizes are constants, never derived from the thread count: that is what keeps
// results bit-identical across OMP_NUM_THREADS.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 256;

}  // namespace

int max_threads() { return omp_get_max_threads(); }

namespace {

// The two matmul primitives behind gemm_bf16_serial (beta 0 and beta 1: a sum post-op), made
// once. Every size and leading dimension is given at execution.
// Where oneDNN has no such primitive (an ISA without bf16 support, e.g. ONEDNN_MAX_CPU_ISA=
// AVX2: oneDNN 2.6 has no run-time-size bf16 matmul there), `available` is false and
// gemm_bf16_serial widens the operands' tiles to fp32 (exact: every bf16 value is an fp32
// value) and runs sgemm: the same products with fp32 accumulation, slower.
struct Bf16Matmul {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::matmul assign, accumulate;
  std::string impl;
  bool available = false;
  Bf16Matmul() {
    try {
      create();
      available = true;
    } catch (const dnnl::error&) {
      impl = "sgemm on bf16 operands widened to fp32 (no bf16 matmul for this ISA)";
    }
  }
  void create() {
    using dt = dnnl::memory::data_type;
    const auto rt = DNNL_RUNTIME_DIM_VAL;
    const dnnl::memory::desc a({rt, rt}, dt::bf16, {rt, 1}), b({rt, rt}, dt::bf16, {rt, 1}),
        c({rt, rt}, dt::f32, {rt, 1});
    const dnnl::matmul::desc md(a, b, c);
    const dnnl::matmul::primitive_desc pd0(md, eng);
    dnnl::post_ops po;
    po.append_sum(1.0f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    const dnnl::matmul::primitive_desc pd1(md, attr, eng);
    impl = pd0.impl_info_str();
    assign = dnnl::matmul(pd0);
    accumulate = dnnl::matmul(pd1);
  }
  static Bf16Matmul& get() {
    (void)cpu();          // MOE_MAX_ISA caps oneDNN before its first primitive
    static Bf16Matmul m;  // thread-safe initialisation
    return m;
  }
};

}  // namespace

void gemm_bf16_serial(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                      const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  MOE_ASSERT(beta == 0.0f || beta == 1.0f);
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  Bf16Matmul& mm = Bf16Matmul::get();
  if (!mm.available) {
    thread_local std::vector<float> a, b;
    a.resize(static_cast<size_t>(M * K));
    b.resize(static_cast<size_t>(K * N));
    for (int64_t i = 0; i < M; ++i)
      for (int64_t p = 0; p < K; ++p) a[i * K + p] = from_bf16(A[i * lda + p]);
    for (int64_t p = 0; p < K; ++p)
      for (int64_t j = 0; j < N; ++j) b[p * N + j] = from_bf16(B[p * ldb + j]);
    gemm_f32_serial(false, false, M, N, K, 1.0f, a.data(), K, b.data(), N, beta, C, ldc);
    return;
  }
  using dt = dnnl::memory::data_type;
  thread_local dnnl::stream stream(mm.eng);
  const dnnl::memory a({{M, K}, dt::bf16, {lda, 1}}, mm.eng, const_cast<uint16_t*>(A));
  const dnnl::memory b({{K, N}, dt::bf16, {ldb, 1}}, mm.eng, const_cast<uint16_t*>(B));
  const dnnl::memory c({{M, N}, dt::f32, {ldc, 1}}, mm.eng, C);
  // One thread, as gemm_f32_serial, so that the blocking and the bits are ours.
  const int saved = omp_get_max_threads();
  const bool limit = saved > 1 && !omp_in_parallel();
  if (limit) omp_set_num_threads(1);
  (beta == 0.0f ? mm.assign : mm.accumulate)
      .execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
  stream.wait();
  if (limit) omp_set_num_threads(saved);
}

const char* gemm_bf16_impl() { return Bf16Matmul::get().impl.c_str(); }

const char* cpu_isa_name() {
  (void)cpu();
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
    case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core: return "avx512_core";
    case dnnl::cpu_isa::avx2_vnni: return "avx2_vnni";
    case dnnl::cpu_isa::avx2: return "avx2";
    case dnnl::cpu_isa::avx: return "avx";
    case dnnl::cpu_isa::sse41: return "sse41";
    default: return "other";
  }
}

void gemm_f32_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                     float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  (void)cpu();  // MOE_MAX_ISA caps oneDNN before its first use
  // Called outside a parallel region, oneDNN would thread the call itself and may split K
  // across threads, which makes the bits depend on OMP_NUM_THREADS (and oversubscribes when
  // we are already parallel above it). One thread keeps the blocking, and the bits, ours.
  const int saved = omp_get_max_threads();
  const bool limit = saved > 1 && !omp_in_parallel();
  if (limit) omp_set_num_threads(1);
  const dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A,
                                      lda, B, ldb, beta, C, ldc);
  if (limit) omp_set_num_threads(saved);
  MOE_ASSERT(st == dnnl_success);
}

namespace {

// One tile of C: rows [lo, lo + m) × columns [n0, n0 + n), for op(A) = A (not transposed).
// oneDNN picks its kernel by shape, so a row's bits can depend on how many rows share the
// call; they do not depend on where in the call the row sits or on the column range. Every
// call therefore gets exactly kRowBlock rows: a short tail is padded with zero rows in
// scratch. A row of C then has the same bits whatever M is — a batch split into parts (over
// processes, say) gives the same rows as the whole batch.
void run_row_tile(bool trans_b, int64_t lo, int64_t m, int64_t n0, int64_t n, int64_t K,
                  float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                  float* C, int64_t ldc) {
  const float* Bt = trans_b ? B + n0 * ldb : B + n0;
  if (m == kRowBlock) {
    gemm_f32_serial(false, trans_b, m, n, K, alpha, A + lo * lda, lda, Bt, ldb, beta,
                    C + lo * ldc + n0, ldc);
    return;
  }
  thread_local std::vector<float> a_pad, c_pad;
  a_pad.assign(static_cast<size_t>(kRowBlock * std::max<int64_t>(K, 1)), 0.0f);
  c_pad.assign(static_cast<size_t>(kRowBlock * n), 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    std::copy(A + (lo + i) * lda, A + (lo + i) * lda + K, &a_pad[i * K]);
    if (beta != 0.0f) std::copy(C + (lo + i) * ldc + n0, C + (lo + i) * ldc + n0 + n, &c_pad[i * n]);
  }
  gemm_f32_serial(false, trans_b, kRowBlock, n, K, alpha, a_pad.data(), std::max<int64_t>(K, 1),
                  Bt, ldb, beta, c_pad.data(), n);
  for (int64_t i = 0; i < m; ++i)
    std::copy(&c_pad[i * n], &c_pad[i * n] + n, C + (lo + i) * ldc + n0);
}

}  // namespace

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const bool by_rows = M >= 2 * kRowBlock || M >= N;
  if (!trans_a) {
    // Tiles of kRowBlock rows (padded) × all columns, or × kColBlock columns when M is small.
    const int64_t rb = (M + kRowBlock - 1) / kRowBlock;
    const int64_t cw = by_rows ? N : kColBlock;
    const int64_t cb = (N + cw - 1) / cw;
    auto run_tile = [&](int64_t t) {
      const int64_t lo = (t / cb) * kRowBlock, n0 = (t % cb) * cw;
      run_row_tile(trans_b, lo, std::min(kRowBlock, M - lo), n0, std::min(cw, N - n0), K, alpha,
                   A, lda, B, ldb, beta, C, ldc);
    };
    if (rb * cb == 1 || omp_in_parallel()) {
      for (int64_t t = 0; t < rb * cb; ++t) run_tile(t);
      return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < rb * cb; ++t) run_tile(t);
    return;
  }
  const int64_t block = by_rows ? kRowBlock : kColBlock;
  const int64_t n_blocks = ((by_rows ? M : N) + block - 1) / block;
  const int64_t extent = by_rows ? M : N;
  auto run_block = [&](int64_t b) {
    const int64_t lo = b * block, n = std::min(block, extent - lo);
    if (by_rows)
      gemm_f32_serial(trans_a, trans_b, n, N, K, alpha, A + lo, lda, B, ldb, beta, C + lo * ldc,
                      ldc);
    else
      gemm_f32_serial(trans_a, trans_b, M, n, K, alpha, A, lda, trans_b ? B + lo * ldb : B + lo,
                      ldb, beta, C + lo, ldc);
  };
  // The same blocks whether serial or parallel, so that both give the same bits.
  if (n_blocks == 1 || omp_in_parallel()) {
    for (int64_t b = 0; b < n_blocks; ++b) run_block(b);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) run_block(b);
}

}  // namespace moe::detail
