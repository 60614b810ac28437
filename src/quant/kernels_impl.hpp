// Internal to quant/kernels*.cpp: the per-path entry points and what they share.
#pragma once
#include <cstdint>

#include "quant/quant_matrix.hpp"

namespace moe::detail::quant_impl {

// The compile-time shapes of the table's rows (the dispatch picks one per matrix).
enum class Codes : int { int4_sym, int4_zp, mxfp4, fp8 };
inline Codes codes_of(const QuantMatrix& W) {
  switch (W.format) {
    case QuantFormatId::int4: return W.zero_points ? Codes::int4_zp : Codes::int4_sym;
    case QuantFormatId::mxfp4: return Codes::mxfp4;
    case QuantFormatId::fp8: return Codes::fp8;
  }
  return Codes::int4_sym;
}

// The bf16 words of a format's code table (quant_code_values), as the widening reads them:
// 4-bit codes: 32 entries — linear codes (int4) hold t − 16 (the index is code + 16 − zero),
// table codes (mxfp4) the 16 values; 8-bit codes: 128 magnitudes (the sign is bit 7).
const uint16_t* bf16_code_table(QuantFormatId id);
// The same as fp32 (4-bit: 16 values; 8-bit: 256).
const float* f32_code_table(QuantFormatId id);
// 2^(s − 127) for every E8M0 byte (255: NaN).
const float* e8m0_table();

// Rows (M ≤ 8) of a decode over columns [n0, n0 + n): A has stride lda, C points at column n0.
void decode_avx512_bf16(const QuantMatrix& W, const uint16_t* A, int64_t lda, int64_t M,
                        int64_t n0, int64_t n, float* C, int64_t ldc);
void decode_avx512(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                   int64_t n, float* C, int64_t ldc);
void decode_avx2(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc);

// quant_widen_panel with AVX-512 (k0 a multiple of 32).
void widen_panel_avx512(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                        uint16_t* panel);

}  // namespace moe::detail::quant_impl
