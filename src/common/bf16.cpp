#include "common/bf16.hpp"

#include <algorithm>

namespace moe::detail {

namespace {
// Conversions of fewer values run on the calling thread (results never depend on the split).
constexpr int64_t kParallelValues = int64_t{1} << 15;
constexpr int64_t kBlock = 32;  // transpose block: 32×32 fp32 reads, 32×32 bf16 writes
}  // namespace

void to_bf16_n(uint16_t* dst, const float* src, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelValues)
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void to_bf16_rows(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                  int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelValues)
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    for (int64_t c = 0; c < cols; ++c) d[c] = to_bf16(s[c]);
  }
}

namespace {
template <typename Src, typename F>
void transpose_blocked(uint16_t* dst, int64_t ldd, const Src* src, int64_t lds, int64_t rows,
                       int64_t cols, F&& convert) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock), c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        uint16_t* d = dst + c * ldd;
        for (int64_t r = r0; r < r1; ++r) d[r] = convert(src[r * lds + c]);
      }
    }
}
}  // namespace

void to_bf16_transposed(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                        int64_t cols) {
  transpose_blocked(dst, ldd, src, lds, rows, cols, [](float v) { return to_bf16(v); });
}

void transpose_bf16(uint16_t* dst, int64_t ldd, const uint16_t* src, int64_t lds, int64_t rows,
                    int64_t cols) {
  transpose_blocked(dst, ldd, src, lds, rows, cols, [](uint16_t v) { return v; });
}

}  // namespace moe::detail
