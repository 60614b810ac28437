// bfloat16 values as uint16_t, and the conversions every bf16 product's operands go through:
// fp32 -> bf16 rounds to nearest even (SPEC §6), NaN stays NaN, infinities stay infinite.
// The vector loops compute exactly what the scalar function does, so a value rounds the same
// wherever it is converted.
#pragma once
#include <cstdint>

namespace moe::detail {

inline uint16_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
// The value a float takes after the round trip fp32 -> bf16 -> fp32.
inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

// dst[i] = bf16(src[i]) for n values; parallel when large.
void to_bf16_n(uint16_t* dst, const float* src, int64_t n);
// Rows of a strided matrix: dst (rows, cols) with stride ldd = bf16(src (rows, cols), lds).
void to_bf16_rows(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                  int64_t cols);
// Transpose while converting: dst (cols, rows), row stride ldd, = bf16(src (rows, cols))ᵀ.
// Serial: callers run it per expert inside their own parallel loops.
void to_bf16_transposed(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                        int64_t cols);

// The same transpose of a matrix already in bf16.
void transpose_bf16(uint16_t* dst, int64_t ldd, const uint16_t* src, int64_t lds, int64_t rows,
                    int64_t cols);

}  // namespace moe::detail
