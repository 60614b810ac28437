// The AVX2 decode of quant/kernels.hpp (the x86-64-v3 baseline: every CPU libmoe runs on):
// fp32 rows, the weights widened 8 at a time to fp32 with the block's scale folded in, vfmadd.
// 4-bit codes: a broadcast word shifted per lane (vpsrlvd); int4's are integers (code − zero,
// converted), mxfp4's go through two vpermps of the 16-entry table; fp8's E4M3 is converted by
// arithmetic (checked against the table once).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/check.hpp"
#include "quant/kernels_impl.hpp"

#define MOE_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))

namespace moe::detail::quant_impl {

namespace {

struct Tables2 {
  __m256 lo, hi;         // 4-bit table codes: values 0..7 and 8..15
  const float* values;   // the code values (unused by the arithmetic conversions)
};

template <Codes Cd>
MOE_AVX2 inline void block_params2(const QuantMatrix& W, int64_t j, int64_t b, __m256* scale,
                                   __m256i* zero) {
  if constexpr (Cd == Codes::int4_sym || Cd == Codes::int4_zp) {
    const uint16_t h = static_cast<const uint16_t*>(W.scales)[j * W.scale_stride + b];
    *scale = _mm256_set1_ps(_cvtsh_ss(h));
    *zero = _mm256_set1_epi32(Cd == Codes::int4_zp ? W.zeros[j * W.zero_stride + b] : 8);
  } else if constexpr (Cd == Codes::mxfp4) {
    *scale = _mm256_set1_ps(e8m0_table()[static_cast<const uint8_t*>(W.scales)[j * W.scale_stride + b]]);
    *zero = _mm256_setzero_si256();
  } else {
    *scale = _mm256_set1_ps(static_cast<const float*>(W.scales)[(j / 128) * W.scale_stride + b]);
    *zero = _mm256_setzero_si256();
  }
}

// Values k0 .. k0 + 7 of a column (k0 a multiple of 8) as fp32, unscaled.
template <Codes Cd>
MOE_AVX2 inline __m256 widen8(const uint8_t* col, int64_t k0, int64_t K, const Tables2& T,
                              __m256i zero) {
  if constexpr (Cd == Codes::fp8) {
    // E4M3 by arithmetic, with no subnormal fp32 on the way: a normal code's magnitude bits
    // << 20 are its fp32 mantissa and its exponent 120 short (added as an integer); a
    // subnormal one (exponent field 0) is its 3 bits · 2^-9; then the sign bit; S.1111.111 is
    // NaN. (The table check in kernels.cpp holds this to the values.)
    (void)T;
    __m128i raw;
    if (K - k0 >= 8) {
      raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(col + k0));
    } else {
      uint64_t tail = 0;
      if (K > k0) std::memcpy(&tail, col + k0, static_cast<size_t>(K - k0));
      raw = _mm_cvtsi64_si128(static_cast<long long>(tail));
    }
    const __m256i c = _mm256_cvtepu8_epi32(raw);
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-9f));
    __m256 v = _mm256_blendv_ps(
        normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag)));
    v = _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24)));
    const __m256 nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
    return _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")), nan);
  } else {
    uint32_t word;
    std::memcpy(&word, col + k0 / 2, 4);
    const __m256i q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)),
                          _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        _mm256_set1_epi32(15));
    if constexpr (Cd == Codes::mxfp4) {
      const __m256 lo = _mm256_permutevar8x32_ps(T.lo, q), hi = _mm256_permutevar8x32_ps(T.hi, q);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
    } else {
      return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zero));
    }
  }
}

template <Codes Cd, int MR, int NC>
MOE_AVX2 void tile_avx2(const QuantMatrix& W, const Tables2& T, const float* A, int64_t lda,
                        int64_t j0, float* C, int64_t ldc) {
  const int64_t S = W.sub_blocks(), spb = W.block_k / 32;
  // Into L2, 8 KiB (whole tiles) ahead, as the AVX-512 kernels do.
  const int64_t tile = NC * W.code_stride, ahead = (8192 + tile - 1) / tile * tile;
  constexpr int64_t shift = Cd == Codes::fp8 ? 0 : 1;  // code byte of value k: k >> shift
  const uint8_t* col[NC];
  #pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) col[c] = W.codes + (j0 + c) * W.code_stride;
  __m256 acc[MR][NC];
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm256_setzero_ps();
  for (int64_t s0 = 0, b = 0; s0 < S; s0 += spb, ++b) {
    const int64_t k1 = std::min(S, s0 + spb) * 32;
    __m256 sv[NC];
    __m256i zv[NC];
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) block_params2<Cd>(W, j0 + c, b, &sv[c], &zv[c]);
    for (int64_t k = 32 * s0; k < k1; k += 8) {
      __m256 w[NC];
      if (((k >> shift) & 63) == 0)
        #pragma GCC unroll 16
        for (int c = 0; c < NC; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(col[c] + ahead + (k >> shift)), _MM_HINT_T1);
      #pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) w[c] = _mm256_mul_ps(widen8<Cd>(col[c], k, W.K, T, zv[c]), sv[c]);
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_loadu_ps(A + m * lda + k);
        #pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) acc[m][c] = _mm256_fmadd_ps(a, w[c], acc[m][c]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      // A fixed reduction order: lanes (i, i + 4), then pairs, then the last two.
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m][c]), _mm256_extractf128_ps(acc[m][c], 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      C[m * ldc + c] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
    }
}

constexpr int nc_avx2(int MR) { return MR <= 2 ? 2 : 1; }

template <Codes Cd, int MR>
MOE_AVX2 void rows_avx2(const QuantMatrix& W, const float* A, int64_t lda, int64_t n0, int64_t n,
                        float* C, int64_t ldc) {
  constexpr int NC = nc_avx2(MR);
  Tables2 T;
  const float* v = f32_code_table(W.format);
  T.lo = _mm256_loadu_ps(v);
  T.hi = _mm256_loadu_ps(v + 8);
  T.values = v;
  int64_t j = 0;
  for (; j + NC <= n; j += NC) tile_avx2<Cd, MR, NC>(W, T, A, lda, n0 + j, C + j, ldc);
  for (; j < n; ++j) tile_avx2<Cd, MR, 1>(W, T, A, lda, n0 + j, C + j, ldc);
}

template <Codes Cd>
void rows_avx2_m(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc) {
  switch (M) {
    case 1: return rows_avx2<Cd, 1>(W, A, lda, n0, n, C, ldc);
    case 2: return rows_avx2<Cd, 2>(W, A, lda, n0, n, C, ldc);
    case 3: return rows_avx2<Cd, 3>(W, A, lda, n0, n, C, ldc);
    case 4: return rows_avx2<Cd, 4>(W, A, lda, n0, n, C, ldc);
    case 5: return rows_avx2<Cd, 5>(W, A, lda, n0, n, C, ldc);
    case 6: return rows_avx2<Cd, 6>(W, A, lda, n0, n, C, ldc);
    case 7: return rows_avx2<Cd, 7>(W, A, lda, n0, n, C, ldc);
    default: return rows_avx2<Cd, 8>(W, A, lda, n0, n, C, ldc);
  }
}

}  // namespace

void decode_avx2(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc) {
  MOE_ASSERT(M >= 1 && M <= 8);
  switch (codes_of(W)) {
    case Codes::int4_sym: return rows_avx2_m<Codes::int4_sym>(W, A, lda, M, n0, n, C, ldc);
    case Codes::int4_zp: return rows_avx2_m<Codes::int4_zp>(W, A, lda, M, n0, n, C, ldc);
    case Codes::mxfp4: return rows_avx2_m<Codes::mxfp4>(W, A, lda, M, n0, n, C, ldc);
    case Codes::fp8: return rows_avx2_m<Codes::fp8>(W, A, lda, M, n0, n, C, ldc);
  }
}

}  // namespace moe::detail::quant_impl
