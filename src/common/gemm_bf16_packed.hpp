// bf16 products against a weight matrix packed once for them (precision "bf16", SPEC §6).
//
// Layout: B (K, N) is cut into panels of 64 columns; panel p holds its K rows in pairs, and
// element (k, j) of B sits at p·Kp·64 + (k/2)·128 + (j − 64p)·2 + k%2, with Kp = K rounded up
// to 32 (a whole AMX tile of K) and N rounded up to 64; the padding is zero. Each 32-bit word is then the pair
// (B[k][j], B[k+1][j]) that one lane of vdpbf16ps multiplies with a pair of A, and a panel's
// 64 columns of one pair of rows are 256 contiguous bytes. This is oneDNN's weight format
// BA16a64b2a (the one its AVX512-BF16 and AMX brgemm kernels ask for at N ≥ 64). The same
// bytes feed the AMX kernel: 16 row pairs × 16 columns of a panel are a B tile read at a
// stride of 256 bytes (kernels/amx_gemm.hpp).
//
// Why: oneDNN's matmul with run-time sizes packs B on every call; with few rows per expert
// (Qwen3-30B-A3B: 32) that packing costs as much as the product. The weights change only
// between optimizer steps, so they are packed once per change (ExpertWeightsBf16) and every
// product reads them in place.
//
// Results: C (M, n) = A (M, K) · B[:, n0 : n0 + n] + beta·C, fp32 accumulation. Each C element
// is summed over k in pairs in increasing order (acc += a[k]·b[k] + a[k+1]·b[k+1], the
// vdpbf16ps step), starting from 0 or C; the row blocking never changes a row's sums, so a
// row's bits do not depend on M, on which rows share a call, on the column range or on the
// thread. Three kernels, chosen per call from cpu() (common/cpu.hpp) and the row count:
//   amx_bf16     tdpbf16ps tiles (kernels/amx_gemm.hpp), at MOE_AMX_MIN_ROWS rows or more
//                where the level is amx: within each 32-value chunk of K it sums even and odd
//                pairs apart (the instruction's definition), so its bits differ from
//                vdpbf16ps's but not with M, the rows sharing a call or the thread;
//   avx512_bf16  vdpbf16ps, as described above (level avx512_bf16, and amx below the rows);
//   widened      the tile's operands widened to fp32 (exact) and one sgemm (level avx2/avx512).
#pragma once
#include <cstdint>

namespace moe::detail {

constexpr int64_t kPanelCols = 64;
constexpr int64_t kPanelKAlign = 32;  // K is padded to this (one AMX tile of bf16 K)

// Number of uint16_t values the packed form of a (K, N) matrix takes.
int64_t packed_bf16_size(int64_t K, int64_t N);

// dst (packed_bf16_size(K, N) values) = bf16 of the (K, N) matrix whose element (k, j) is
// src[k·sk + j·sj]: sk = N, sj = 1 for a row-major matrix, sk = 1, sj = K for the transpose
// of a row-major (N, K) one. Serial: callers run it per expert inside their parallel loops.
void pack_bf16(uint16_t* dst, const float* src, int64_t sk, int64_t sj, int64_t K, int64_t N);
// The same from bf16 values.
void pack_bf16(uint16_t* dst, const uint16_t* src, int64_t sk, int64_t sj, int64_t K, int64_t N);

// Element (k, j) of a packed (K, N) matrix, for tests and references.
inline int64_t packed_bf16_index(int64_t K, int64_t k, int64_t j) {
  const int64_t Kp = (K + kPanelKAlign - 1) / kPanelKAlign * kPanelKAlign;
  return (j / kPanelCols) * Kp * kPanelCols + (k / 2) * 2 * kPanelCols + (j % kPanelCols) * 2 +
         k % 2;
}

// C (M, n) = A (M, K) · B[:, n0 : n0 + n] + beta·C on the calling thread, B packed (K, N) as
// above; n0 a multiple of 64, n0 + n ≤ N, beta 0 or 1, A row-major with stride lda, C with
// stride ldc (C points at the tile's first column).
void gemm_bf16_packed_serial(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                             int64_t lda, const uint16_t* Bp, float beta, float* C, int64_t ldc);

// Each kernel of gemm_bf16_packed_serial by name (public for tests and benchmarks; the same
// contract, K > 0). The AMX one runs on the instructions only where cpu() says amx, and on
// their emulation (kernels/amx_tile.hpp) when emulated; the AVX-512 one needs AVX512-BF16.
void gemm_bf16_packed_amx(bool emulated, int64_t M, int64_t n0, int64_t n, int64_t K,
                          const uint16_t* A, int64_t lda, const uint16_t* Bp, float beta,
                          float* C, int64_t ldc);
void gemm_bf16_packed_avx512(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                             int64_t lda, const uint16_t* Bp, float beta, float* C,
                             int64_t ldc);
// The tile's operands widened to fp32, exactly, and one serial sgemm.
void gemm_bf16_packed_widened(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                              int64_t lda, const uint16_t* Bp, float beta, float* C,
                              int64_t ldc);

// Whether the level allows the vdpbf16ps kernel (avx512_bf16 or amx); false: widened.
bool packed_bf16_native();
// The same in words, for reports (moe.cpu_info()).
const char* gemm_bf16_packed_impl();

}  // namespace moe::detail
