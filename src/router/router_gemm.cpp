// The router's product h = x · W_g (router_rows.hpp: gemm_f32_rows): every element one fp32
// fma chain over K in order, so a row's bits never depend on the batch around it, and a token
// decoded alone reads W_g once instead of a padded block of rows.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/check.hpp"
#include "common/cpu.hpp"
#include "router/router_rows.hpp"

namespace moe::detail {

namespace {

#define MOE_ROUTER_AVX512 __attribute__((target("avx512f,avx512vl,fma")))
#define MOE_ROUTER_AVX2 __attribute__((target("avx2,fma")))

// Rows and columns a micro-tile holds in registers, K values per pass (the pass's slice of
// B — Kb × 64 floats, 64 KiB — stays in L2 while the task's row tiles run over it), and the
// rows and columns of a parallel task.
constexpr int kTileRows = 6;
constexpr int64_t kPassK = 256;
constexpr int64_t kTaskRows = 48;
constexpr int64_t kTaskCols = 64;

// C[r][c] = (first ? 0 : C[r][c]) + Σ_{i < kc} x[r][i] · B[i][c], one fma per i in order:
// MR rows × NV vectors of 16 columns, `last` the lanes of the last vector that are columns.
template <int MR, int NV>
MOE_ROUTER_AVX512 void tile_avx512(const float* x, int64_t ldx, const float* B, int64_t ldb,
                                   int64_t kc, float* C, int64_t ldc, __mmask16 last, bool first) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[m][v] = first ? _mm512_setzero_ps()
                        : _mm512_maskz_loadu_ps(v + 1 < NV ? __mmask16(0xffff) : last,
                                                C + m * ldc + 16 * v);
  for (int64_t i = 0; i < kc; ++i) {
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = _mm512_maskz_loadu_ps(v + 1 < NV ? __mmask16(0xffff) : last, B + i * ldb + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xm = _mm512_set1_ps(x[m * ldx + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xm, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(C + m * ldc + 16 * v, v + 1 < NV ? __mmask16(0xffff) : last,
                            acc[m][v]);
}

// The same on AVX2: NV vectors of 8 columns, `last` (8 lanes, −1 where a column) masks the
// last one.
template <int MR, int NV>
MOE_ROUTER_AVX2 void tile_avx2(const float* x, int64_t ldx, const float* B, int64_t ldb,
                               int64_t kc, float* C, int64_t ldc, __m256i last, bool first) {
  const __m256i all = _mm256_set1_epi32(-1);
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[m][v] = first ? _mm256_setzero_ps()
                        : _mm256_maskload_ps(C + m * ldc + 8 * v, v + 1 < NV ? all : last);
  for (int64_t i = 0; i < kc; ++i) {
    __m256 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = _mm256_maskload_ps(B + i * ldb + 8 * v, v + 1 < NV ? all : last);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xm = _mm256_set1_ps(x[m * ldx + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xm, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm256_maskstore_ps(C + m * ldc + 8 * v, v + 1 < NV ? all : last, acc[m][v]);
}

// Rows [r0, r0 + mr) × columns [c0, c0 + nc) of one K pass, in micro-tiles: kTileRows rows
// × 64 columns (AVX-512) or × 16 (AVX2).
template <int MR, int... NV>
void rows_avx512(const float* x, int64_t d, const float* B, int64_t N, int64_t k0, int64_t kc,
                 float* C, int64_t ldc, int64_t nc, bool first,
                 std::integer_sequence<int, NV...>) {
  const int64_t nv = (nc + 15) / 16;
  const int64_t tail = nc - 16 * (nv - 1);
  const __mmask16 last = tail >= 16 ? __mmask16(0xffff) : __mmask16((1u << tail) - 1u);
  ((nv == NV + 1 ? tile_avx512<MR, NV + 1>(x + k0, d, B + k0 * N, N, kc, C, ldc, last, first)
                 : void()),
   ...);
}

template <int MR, int... NV>
void rows_avx2(const float* x, int64_t d, const float* B, int64_t N, int64_t k0, int64_t kc,
               float* C, int64_t ldc, int64_t nc, bool first, std::integer_sequence<int, NV...>) {
  const int64_t nv = (nc + 7) / 8;
  const int64_t tail = nc - 8 * (nv - 1);
  alignas(32) int32_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = l < tail ? -1 : 0;
  const __m256i last = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  ((nv == NV + 1 ? tile_avx2<MR, NV + 1>(x + k0, d, B + k0 * N, N, kc, C, ldc, last, first)
                 : void()),
   ...);
}

template <int... MR>
void run_tile(bool avx512, int64_t mr, const float* x, int64_t d, const float* B, int64_t N,
              int64_t k0, int64_t kc, float* C, int64_t ldc, int64_t nc, bool first,
              std::integer_sequence<int, MR...>) {
  (((mr == MR + 1)
        ? (avx512 ? rows_avx512<MR + 1>(x, d, B, N, k0, kc, C, ldc, nc, first,
                                         std::make_integer_sequence<int, 4>{})
                  : rows_avx2<MR + 1>(x, d, B, N, k0, kc, C, ldc, nc, first,
                                      std::make_integer_sequence<int, 2>{}))
        : void()),
   ...);
}

}  // namespace

void gemm_f32_rows(float* C, int64_t ldc, const float* x, const float* B, int64_t T, int64_t d,
                   int64_t N) {
  if (T <= 0 || N <= 0) return;
  if (d <= 0) {
    for (int64_t t = 0; t < T; ++t) std::fill(C + t * ldc, C + t * ldc + N, 0.0f);
    return;
  }
  const bool avx512 = isa_at_least(Isa::avx512);
  const int64_t tile_cols = avx512 ? 64 : 16;
  // Few rows (a decode step): narrower tasks, so that every thread reads its share of B.
  const int64_t row_tasks = (T + kTaskRows - 1) / kTaskRows;
  const int64_t task_cols = row_tasks >= 4 ? kTaskCols : tile_cols;
  const int64_t col_tasks = (N + task_cols - 1) / task_cols;
#pragma omp parallel for schedule(static) if (row_tasks * col_tasks > 1 && T * N * d >= (1 << 16))
  for (int64_t task = 0; task < row_tasks * col_tasks; ++task) {
    const int64_t r0 = task / col_tasks * kTaskRows, rn = std::min(kTaskRows, T - r0);
    const int64_t c0 = task % col_tasks * task_cols, cn = std::min(task_cols, N - c0);
    for (int64_t k0 = 0; k0 < d; k0 += kPassK) {
      const int64_t kc = std::min(kPassK, d - k0);
      for (int64_t r = r0; r < r0 + rn; r += kTileRows)
        for (int64_t c = c0; c < c0 + cn; c += tile_cols)
          run_tile(avx512, std::min<int64_t>(kTileRows, r0 + rn - r), x + r * d, d, B + c, N, k0,
                   kc, C + r * ldc + c, ldc, std::min(tile_cols, c0 + cn - c), k0 == 0,
                   std::make_integer_sequence<int, kTileRows>{});
    }
  }
}

}  // namespace moe::detail
