#include "experts/bf16.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/check.hpp"

namespace moe::detail {

namespace {

// Tiles of the grouped product: constants, never derived from the thread count.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileBlocks = 4;  // column blocks of kBf16Cols per tile: 256 columns
constexpr int kMaxRows = 4;         // rows per micro-kernel call

struct Tile {
  int64_t e, m0, m, j0, nj;
};

#ifdef __AVX512BF16__
// C (mr, ncols) = Σ_i a-pairs(mr rows, i) · w-pairs(i, 64 columns), fp32 accumulators.
template <int MR>
void micro(float* C, int64_t ldc, const uint32_t* ap, int64_t K2, const uint16_t* w,
           int64_t ncols) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K2; ++i) {
    const uint16_t* wi = w + i * (2 * kBf16Cols);
    const __m512i w0 = _mm512_loadu_si512(wi);
    const __m512i w1 = _mm512_loadu_si512(wi + 32);
    const __m512i w2 = _mm512_loadu_si512(wi + 64);
    const __m512i w3 = _mm512_loadu_si512(wi + 96);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * K2 + i]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, (__m512bh)w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, (__m512bh)w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, (__m512bh)w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, (__m512bh)w3);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) {
      const int64_t c0 = v * 16;
      if (c0 >= ncols) break;
      const int64_t n = std::min<int64_t>(16, ncols - c0);
      const __mmask16 mask = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
      _mm512_mask_storeu_ps(C + r * ldc + c0, mask, acc[r][v]);
    }
}

void micro_any(int mr, float* C, int64_t ldc, const uint32_t* ap, int64_t K2, const uint16_t* w,
               int64_t ncols) {
  switch (mr) {
    case 1: micro<1>(C, ldc, ap, K2, w, ncols); break;
    case 2: micro<2>(C, ldc, ap, K2, w, ncols); break;
    case 3: micro<3>(C, ldc, ap, K2, w, ncols); break;
    default: micro<4>(C, ldc, ap, K2, w, ncols); break;
  }
}
#else
// The portable loop: the same products, the pair's two terms added in the same order.
void micro_any(int mr, float* C, int64_t ldc, const uint32_t* ap, int64_t K2, const uint16_t* w,
               int64_t ncols) {
  float acc[kMaxRows][kBf16Cols] = {};
  for (int64_t i = 0; i < K2; ++i) {
    const uint16_t* wi = w + i * (2 * kBf16Cols);
    for (int r = 0; r < mr; ++r) {
      const float a0 = from_bf16(static_cast<uint16_t>(ap[r * K2 + i] & 0xffffu));
      const float a1 = from_bf16(static_cast<uint16_t>(ap[r * K2 + i] >> 16));
      for (int64_t c = 0; c < kBf16Cols; ++c)
        acc[r][c] += a0 * from_bf16(wi[2 * c]) + a1 * from_bf16(wi[2 * c + 1]);
    }
  }
  for (int r = 0; r < mr; ++r) std::copy(acc[r], acc[r] + ncols, C + r * ldc);
}
#endif

}  // namespace

bool bf16_native() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

void PackedBf16::pack(const float* W, int64_t E_, int64_t K_, int64_t N_) {
  E = E_;
  K = K_;
  N = N_;
  K2 = (K + 1) / 2;
  NB = (N + kBf16Cols - 1) / kBf16Cols;
  data.assign(static_cast<size_t>(E * NB * K2 * 2 * kBf16Cols), 0);
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < NB; ++j) {
      uint16_t* blk = data.data() + ((e * NB + j) * K2) * (2 * kBf16Cols);
      const int64_t c0 = j * kBf16Cols, nc = std::min(kBf16Cols, N - c0);
      for (int64_t k = 0; k < K; ++k) {
        const float* row = W + (e * K + k) * N + c0;
        uint16_t* dst = blk + (k / 2) * (2 * kBf16Cols) + (k % 2);
        for (int64_t c = 0; c < nc; ++c) dst[2 * c] = to_bf16(row[c]);
      }
    }
}

void grouped_gemm_bf16(float* C, int64_t ldc, const float* A, int64_t lda, const PackedBf16& W,
                       const int64_t* off) {
  const int64_t E = W.E, K = W.K, K2 = W.K2, NB = W.NB, N = W.N;
  thread_local std::vector<Tile> tiles;  // reused: no allocation in steady state
  tiles.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    for (int64_t m0 = 0; m0 < n; m0 += kTileRows)
      for (int64_t j0 = 0; j0 < NB; j0 += kTileBlocks)
        tiles.push_back({e, off[e] + m0, std::min(kTileRows, n - m0), j0,
                         std::min(kTileBlocks, NB - j0)});
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const Tile* tl = tiles.data();
#pragma omp parallel
  {
    // The tile's rows of A as bf16 pairs; sized by every thread up front, so a thread that
    // happens to get its first tile in a later call does not allocate then.
    thread_local std::vector<uint32_t> ap;
    if (ap.size() < static_cast<size_t>(kTileRows * K2)) ap.resize(static_cast<size_t>(kTileRows * K2));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const Tile& tile = tl[t];
      for (int64_t r = 0; r < tile.m; ++r) {
        const float* a = A + (tile.m0 + r) * lda;
        uint32_t* dst = ap.data() + r * K2;
        for (int64_t i = 0; i < K / 2; ++i)
          dst[i] = static_cast<uint32_t>(to_bf16(a[2 * i])) |
                   (static_cast<uint32_t>(to_bf16(a[2 * i + 1])) << 16);
        if (K % 2) dst[K2 - 1] = to_bf16(a[K - 1]);
      }
      for (int64_t j = tile.j0; j < tile.j0 + tile.nj; ++j) {
        const uint16_t* wb = W.block(tile.e, j);
        const int64_t c0 = j * kBf16Cols, nc = std::min(kBf16Cols, N - c0);
        for (int64_t r = 0; r < tile.m; r += kMaxRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, tile.m - r));
          micro_any(mr, C + (tile.m0 + r) * ldc + c0, ldc, ap.data() + r * K2, K2, wb, nc);
        }
      }
    }
  }
}

}  // namespace moe::detail
