// Row-major single-precision GEMM: C (M, N) = alpha·op(A)·op(B) + beta·C, with op(A) (M, K)
// and op(B) (K, N). The fast version runs on oneDNN; the reference is obvious loops on any
// scalar type and is the oracle in tests.
//
// Determinism: gemm_f32 splits C into fixed-size row blocks (or column blocks when M is
// small), independent of the thread count, and calls oneDNN's sgemm serially on each block.
// The reduction dimension K is never split, so every element is summed in the same order
// whatever OMP_NUM_THREADS is.
//
// Row independence (when op(A) is not transposed): every oneDNN call gets exactly 64 rows of
// A, a short tail padded with zeros, so a row of C has the same bits whatever M is and
// whichever rows share its call. A batch routed whole or in parts (as expert parallelism
// splits it over processes) gives the same logits and the same router dx.
#pragma once
#include <cstdint>

namespace moe::detail {

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc);

// One thread, no parallel split: for callers already inside a parallel region.
void gemm_f32_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                     float* C, int64_t ldc);

// bf16 operands, fp32 accumulation and result: C (M, N) = A (M, K) · B (K, N) + beta·C with
// beta 0 or 1, all row-major with unit column stride, on one thread (callers parallelise over
// fixed tiles, as with gemm_f32_serial). oneDNN's matmul with run-time sizes and strides:
// one primitive per beta for the whole process, whatever the shapes, so no call creates or
// compiles anything after the first. The ISA is oneDNN's choice (AVX512-BF16 here, AMX where
// present; ONEDNN_MAX_CPU_ISA limits it), and the K loop is never split. It packs B on every
// call: the layer uses it where B is activations (the weight gradients); products with a
// weight matrix read it packed once (common/gemm_bf16_packed.hpp).
void gemm_bf16_serial(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                      const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The implementation oneDNN runs gemm_bf16_serial with, e.g. "gemm:jit", and the ISA it may
// use at most ("avx512_core_bf16", ...), for reports.
const char* gemm_bf16_impl();
const char* cpu_isa_name();

template <typename S>
void gemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, S alpha, const S* A,
              int64_t lda, const S* B, int64_t ldb, S beta, S* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      S acc = 0;
      for (int64_t p = 0; p < K; ++p) {
        const S a = trans_a ? A[p * lda + i] : A[i * lda + p];
        const S b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = alpha * acc + (beta == S(0) ? S(0) : beta * C[i * ldc + j]);
    }
}

// Number of OpenMP threads a parallel region would use here.
int max_threads();

}  // namespace moe::detail
