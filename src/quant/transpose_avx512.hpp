// A 16 × 16 transpose of dwords in AVX-512 registers, shared by the panel widenings of
// quant/kernels_avx512.cpp (bf16 pairs) and quant/prefill_vnni.cpp (groups of 4 int8 values).
// Only included by translation units whose callers carry an AVX-512 target.
#pragma once
#include <immintrin.h>

namespace moe::detail::quant_impl {

// rows[i] (16 dwords each) → rows[l][i] = old rows[i][l].
__attribute__((target("avx512f"), always_inline)) inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane q: column 4q + c of rows 4i .. 4i + 3
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  #pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    const __m512i x = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i y = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i z = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i v = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_i32x4(x, z, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(x, z, 0xDD);
    t[4 + c] = _mm512_shuffle_i32x4(y, v, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(y, v, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace moe::detail::quant_impl
