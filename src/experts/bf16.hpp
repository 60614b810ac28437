// bf16 expert weights for inference (issue 5, item 4): the stacked weights rounded once to
// bfloat16 (round to nearest even) and packed for the AVX512-BF16 dot-product instruction;
// activations are rounded to bf16 as they enter each product, and every sum is accumulated
// in fp32. Half the bytes of fp32 per weight, which is what a memory-bound decode step
// reads. docs/design.md, "bf16 expert weights", says what it promises.
#pragma once
#include <cstdint>
#include <vector>

namespace moe::detail {

// fp32 -> bf16, round to nearest even; NaN stays NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// E matrices (K, N), row-major in fp32, packed per expert as column blocks of kBf16Cols:
// block j holds, for each pair of rows (2i, 2i+1), the 64 columns' values interleaved
// [w(2i, c), w(2i+1, c)] — the operand layout of vdpbf16ps. K and N are zero-padded to the
// block (an odd K gets a zero row), so padding adds nothing to any sum.
inline constexpr int64_t kBf16Cols = 64;

struct PackedBf16 {
  int64_t E = 0, K = 0, N = 0;
  int64_t K2 = 0, NB = 0;  // row pairs, column blocks
  std::vector<uint16_t> data;
  bool empty() const { return data.empty(); }
  const uint16_t* block(int64_t e, int64_t j) const {
    return data.data() + ((e * NB + j) * K2) * (2 * kBf16Cols);
  }
  void pack(const float* W, int64_t E, int64_t K, int64_t N);
  void clear() { *this = PackedBf16{}; }
};

// C rows [off[e], off[e+1]) (n_e, N), row stride ldc, = A rows (n_e, K) (fp32, stride lda,
// rounded to bf16 on the way in) · W_e for every expert with rows. C is assigned. Parallel
// over fixed tiles of (expert, 64 rows, 256 columns); each output is one fp32 sum over K in
// order, so the bits do not depend on the thread count.
void grouped_gemm_bf16(float* C, int64_t ldc, const float* A, int64_t lda, const PackedBf16& W,
                       const int64_t* off);

// Whether the AVX512-BF16 kernel was compiled in (else a portable loop computes the same
// products, slower).
bool bf16_native();

}  // namespace moe::detail
