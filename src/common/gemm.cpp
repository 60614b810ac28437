#include "common/gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>

#include "common/check.hpp"

namespace moe::detail {

namespace {

// Block sizes are constants, never derived from the thread count: that is what keeps
// results bit-identical across OMP_NUM_THREADS.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 256;

}  // namespace

int max_threads() { return omp_get_max_threads(); }

void gemm_f32_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                     float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  const dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A,
                                      lda, B, ldb, beta, C, ldc);
  MOE_ASSERT(st == dnnl_success);
}

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const bool by_rows = M >= 2 * kRowBlock || M >= N;
  const int64_t block = by_rows ? kRowBlock : kColBlock;
  const int64_t n_blocks = ((by_rows ? M : N) + block - 1) / block;
  const int64_t extent = by_rows ? M : N;
  auto run_block = [&](int64_t b) {
    const int64_t lo = b * block, n = std::min(block, extent - lo);
    if (by_rows)
      gemm_f32_serial(trans_a, trans_b, n, N, K, alpha, trans_a ? A + lo : A + lo * lda, lda, B,
                      ldb, beta, C + lo * ldc, ldc);
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
