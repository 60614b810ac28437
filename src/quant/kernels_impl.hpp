// Internal to quant/kernels*.cpp: the per-path entry points and what they share.
#pragma once
#include <cstdint>

#include "quant/kernels.hpp"
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

// The unsigned byte vpdpbusd reads for a code that stands for zero, in the formats whose
// zero is one constant (int4 symmetric: the code 8; mxfp4: 2·E2M1 + 12, the 12 of its byte
// table); formats with zero points carry theirs per block.
inline float s8_rows_fixed_zero(const QuantMatrix& W) {
  return W.format == QuantFormatId::mxfp4 ? 12.0f : 8.0f;
}

// The bf16 words of a format's code table (quant_code_values), as the widening reads them:
// 4-bit codes: 32 entries — linear codes (int4) hold t − 16 (the index is code + 16 − zero),
// table codes (mxfp4) the 16 values; 8-bit codes: 128 magnitudes (the sign is bit 7).
const uint16_t* bf16_code_table(QuantFormatId id);
// The same as fp32 (4-bit: 16 values; 8-bit: 256).
const float* f32_code_table(QuantFormatId id);
// 2^(s − 127) for every E8M0 byte (255: NaN).
const float* e8m0_table();

// The decode's order of a chunk's 128 values for 4-bit codes on avx512_bf16: position p holds
// value interleaved_source(p). Of the 64 code bytes (byte i: values 2i, 2i + 1), vector v of
// the four widened ones is vpunpcklbw (v = 0, 2) or vpunpckhbw (v = 1, 3) of the low (v < 2)
// or high (v ≥ 2) nibbles' table bytes; in its 128-bit lane L, word j is byte
// 16L + 8·(v & 1) + j. Lane L of every vector thus holds sub-block L of the chunk only.
constexpr int interleaved_source(int p) {
  const int v = p / 32, L = (p % 32) / 8, j = p % 8;
  return 32 * L + 16 * (v & 1) + 2 * j + (v >> 1);
}

// The same for 8-bit codes (fp8) on avx512_bf16 with VBMI (decode_avx512_bf16): each 64 codes
// of a chunk's 128 (half h) become two vectors by vpunpcklbw (v = 0) and vpunpckhbw (v = 1) of
// their table bytes, so word p of vector v holds code 16·(p / 8) + 8·v + p % 8 of the half.
constexpr int interleaved8_source(int p) {
  const int h = p / 64, v = (p % 64) / 32, q = p % 32;
  return 64 * h + 16 * (q / 8) + 8 * v + q % 8;
}

// Rows (M ≤ 16) of a decode over columns [n0, n0 + n): rows.data (bf16) from row i0 on, C
// points at column n0 of row i0.
void decode_avx512_bf16(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                        int64_t n0, int64_t n, float* C, int64_t ldc);
// The same with int8 rows (4-bit codes).
void decode_avx512_vnni(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                        int64_t n0, int64_t n, float* C, int64_t ldc);
// The same on a tiled matrix (M ≤ 8; rows.tiled).
void decode_avx512_vnni_tiled(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                              int64_t n0, int64_t n, float* C, int64_t ldc);
// The codes of tiles [t0, t0 + tiles) of a tiled matrix in the column layout (dst: column
// after column, 16·S bytes each), by 16 × 16 dword transposes.
void untile_codes_avx512(const QuantMatrix& W, int64_t t0, int64_t tiles, uint8_t* dst);
// Rows (M ≤ 8) on the fp32 paths: A has stride lda.
void decode_avx512(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                   int64_t n, float* C, int64_t ldc);
void decode_avx2(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc);

// quant_widen_panel with AVX-512 (k0 a multiple of 32).
void widen_panel_avx512(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                        uint16_t* panel);

// Prefill on avx512_vnni (quant/prefill_vnni.cpp, 4-bit codes): the bytes of workspace it
// needs, one row (kernel order, ld values, zero-padded to whole chunks) quantized to u8 rows
// (int8 per 128 values + 128) with its scales per chunk, and the product of rows prepared so.
int64_t prefill_vnni_workspace_bytes(const QuantMatrix& W);
void prefill_vnni_rows(const float* v, int64_t ld, uint8_t* dst, float* scales);
// A row of a tiled matrix's decode (QuantRows::tiled; v as above): int8 per G (32, 64 or 128)
// values, placed per chunk even then odd, into dst; scales[b] = the block's quant_s8_scale ·
// half and sums[b] = Σ of its int8 values, times zero · scales[b] where zero is not 0.
void tiled_vnni_rows(const float* v, int64_t ld, int64_t G, float half, float zero, int8_t* dst,
                     float* scales, float* sums);
void prefill_vnni_serial(const QuantMatrix& W, const QuantRows& rows, int64_t n0, int64_t n,
                         float* C, int64_t ldc, unsigned char* ws, QuantNext next);
// One prefill panel: columns [j, j + n) and K [k, k + kc) of W; none when n ≤ 0.
struct QuantPanel {
  const QuantMatrix* W = nullptr;
  int64_t j = 0, n = 0, k = 0, kc = 0;
};
// The panel after (columns [n0 + j, +64), K from k0) of a serial prefill over columns
// [n0, n0 + n): the next K panel, else the next 64 columns, else `next` (its first panel).
QuantPanel next_panel(const QuantMatrix& W, int64_t n0, int64_t n, int64_t j, int64_t k0,
                      QuantNext next);
// Whether prefill_vnni_serial sums mxfp4's panel of columns [j0, j0 + nc) and K [k0, k0 + kc)
// in blocks of 128 (each column's four exponents of a chunk within 3 of their least), not 32.
bool prefill_vnni_mxfp4_shared(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0,
                               int64_t kc);

// Part `part` of `parts` of the lines panel p reads, codes and scales, into L2: prefill asks
// for the next panel's while this one's products run (the codes come from memory; the
// widening alone stalled on them for half its time). Nothing when p is none.
void prefetch_panel(const QuantPanel& p, int64_t part, int64_t parts);

}  // namespace moe::detail::quant_impl
