#include "common/gemm_bf16_packed.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/bf16.hpp"
#include "common/cpu.hpp"
#include "common/check.hpp"
#include "common/gemm.hpp"
#include "kernels/amx_gemm.hpp"

namespace moe::detail {

namespace {
constexpr int64_t kPanelValues = 2 * kPanelCols;  // one pair of rows of a panel
int64_t padded_k(int64_t K) { return (K + kPanelKAlign - 1) / kPanelKAlign * kPanelKAlign; }
int64_t padded_n(int64_t N) { return (N + kPanelCols - 1) / kPanelCols * kPanelCols; }

// Each 32-bit word of a panel is the pair (row k, row k+1) of one column: written whole, one
// panel row pair (64 words) at a time; a row-major source is read along its rows, a transposed
// one along the pairs (k, k+1) that sit side by side in it.
template <typename Src, typename F>
uint32_t pair_word(const Src* s, int64_t k, int64_t K, F& convert) {  // s: column's element 0
  const uint32_t lo = k < K ? convert(s[k]) : 0u;
  const uint32_t hi = k + 1 < K ? convert(s[k + 1]) : 0u;
  return lo | hi << 16;
}

// A transposed source (sk == 1: a column of the matrix is a run of the source): one panel's
// kTilePairs pairs at a time, reading each of its 64 columns along a run of 2·kTilePairs values
// into a tile that is then written whole. Reading the panel one pair at a time instead touches
// 64 source rows per 256 bytes written (a stored checkpoint's (out, in) matrices: the loader's
// time went there).
constexpr int64_t kTilePairs = 32;
template <typename Src, typename F>
void pack_transposed(uint16_t* dst, const Src* src, int64_t sj, int64_t K, int64_t N,
                     F& convert) {
  const int64_t Kp = padded_k(K), Np = padded_n(N), pairs = Kp / 2, full = K / 2;
  uint32_t tile[kTilePairs][kPanelCols];
  for (int64_t j0 = 0; j0 < Np; j0 += kPanelCols) {
    uint16_t* panel = dst + j0 * Kp;
    const int64_t nc = std::max<int64_t>(0, std::min(kPanelCols, N - j0));
    for (int64_t q0 = 0; q0 < pairs; q0 += kTilePairs) {
      const int64_t qn = std::min(kTilePairs, pairs - q0);
      const int64_t qf = std::clamp<int64_t>(full - q0, 0, qn);  // pairs with both rows stored
      for (int64_t j = 0; j < nc; ++j) {
        const Src* s = src + (j0 + j) * sj + 2 * q0;
        // The same column's run two tiles on: 64 runs, a stored row apart each, are more
        // streams than the hardware prefetchers follow; without this the loop waited on
        // memory at every run.
        if (q0 + 3 * kTilePairs <= pairs)
          for (int64_t b = 0; b < 2 * kTilePairs * int64_t(sizeof(Src)); b += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(s + 4 * kTilePairs) + b);
        for (int64_t t = 0; t < qf; ++t)
          tile[t][j] = convert(s[2 * t]) | static_cast<uint32_t>(convert(s[2 * t + 1])) << 16;
        for (int64_t t = qf; t < qn; ++t) tile[t][j] = pair_word(s - 2 * q0, 2 * (q0 + t), K, convert);
      }
      for (int64_t t = 0; t < qn; ++t)
        for (int64_t j = nc; j < kPanelCols; ++j) tile[t][j] = 0;
      std::memcpy(panel + q0 * kPanelValues, tile, static_cast<size_t>(qn) * sizeof(tile[0]));
    }
  }
}

template <typename Src, typename F>
void pack_impl(uint16_t* dst, const Src* src, int64_t sk, int64_t sj, int64_t K, int64_t N,
               F&& convert) {
  if (sk == 1 && sj != 1) return pack_transposed(dst, src, sj, K, N, convert);
  const int64_t Kp = padded_k(K), Np = padded_n(N);
  for (int64_t j0 = 0; j0 < Np; j0 += kPanelCols) {
    uint16_t* panel = dst + j0 * Kp;
    const int64_t nc = std::max<int64_t>(0, std::min(kPanelCols, N - j0));
    for (int64_t k = 0; k < Kp; k += 2) {
      uint32_t words[kPanelCols] = {};
      if (k + 1 < K) {
        const Src* s0 = src + k * sk + j0 * sj;
        const Src* s1 = s0 + sk;
        if (sj == 1)
          for (int64_t j = 0; j < nc; ++j)
            words[j] = convert(s0[j]) | static_cast<uint32_t>(convert(s1[j])) << 16;
        else
          for (int64_t j = 0; j < nc; ++j)
            words[j] = convert(s0[j * sj]) | static_cast<uint32_t>(convert(s1[j * sj])) << 16;
      } else if (k < K) {
        const Src* s0 = src + k * sk + j0 * sj;
        for (int64_t j = 0; j < nc; ++j) words[j] = convert(s0[j * sj]);
      }
      std::memcpy(panel + (k / 2) * kPanelValues, words, sizeof(words));
    }
  }
}
}  // namespace

int64_t packed_bf16_size(int64_t K, int64_t N) { return padded_k(K) * padded_n(N); }

void pack_bf16(uint16_t* dst, const float* src, int64_t sk, int64_t sj, int64_t K, int64_t N) {
  pack_impl(dst, src, sk, sj, K, N, [](float v) { return to_bf16(v); });
}

void pack_bf16(uint16_t* dst, const uint16_t* src, int64_t sk, int64_t sj, int64_t K, int64_t N) {
  pack_impl(dst, src, sk, sj, K, N, [](uint16_t v) { return v; });
}

bool packed_bf16_native() { return isa_at_least(Isa::avx512_bf16); }

const char* gemm_bf16_packed_impl() {
  if (amx_kernels())
    return amx_hardware() ? "packed:amx_bf16 (tdpbf16ps; vdpbf16ps below MOE_AMX_MIN_ROWS rows)"
                          : "packed:amx_bf16 emulated (MOE_AMX_EMULATE; tests only)";
  return packed_bf16_native() ? "packed:avx512_bf16 (vdpbf16ps)"
                              : "packed:widened to fp32, sgemm (no AVX512-BF16 allowed)";
}

namespace {

#define MOE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// MR rows of C × one panel's 64 columns (the first `cols` of them stored), over all of K.
// Accumulators stay in registers: MR·4 of them, plus the panel's 4 vectors of one row pair;
// A's pairs come as 32-bit broadcasts.
// prefetch: one cache line per pair of rows of B, fetched into L2 along the loop (a quarter
// of the next panel's bytes; see gemm_native).
template <int MR>
MOE_BF16_TARGET void panel_rows(int64_t K, const uint16_t* A, int64_t lda, const uint16_t* panel,
                                const uint16_t* prefetch, bool accumulate, float* C, int64_t ldc,
                                const __mmask16* mask) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v)
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], C + r * ldc + 16 * v)
                             : _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const uint16_t* b = panel + q * kPanelValues;
    _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * kPanelValues), _MM_HINT_T1);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(b + 96);
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, A + r * lda + 2 * q, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(word);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
  if (K % 2) {  // the last row of B pairs with the zero padding: A's pair is (a[K-1], 0)
    const uint16_t* b = panel + pairs * kPanelValues;
    __m512bh bv[4];
    for (int v = 0; v < 4; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 32 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(A[r * lda + K - 1]));
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, mask[v], acc[r][v]);
}

// Row blocks of 6 (6·4 accumulators + 4 panel vectors of the 32 registers); the last block
// takes the remainder. Which block a row falls in never changes its sums.
constexpr int kRowsPerBlock = 6;

MOE_BF16_TARGET void gemm_native(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                                 int64_t lda, const uint16_t* Bp, bool accumulate, float* C,
                                 int64_t ldc) {
  const int64_t Kp = padded_k(K);
  for (int64_t j0 = 0; j0 < n; j0 += kPanelCols) {
    const uint16_t* panel = Bp + (n0 + j0) * Kp;
    const int64_t nc = std::min(kPanelCols, n - j0);
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t c = std::clamp<int64_t>(nc - 16 * v, 0, 16);
      mask[v] = static_cast<__mmask16>((1u << c) - 1u);
    }
    // The weights stream from memory (a real model's experts do not fit in cache): while
    // this panel's row blocks run from cache, block b fetches quarter b % 4 of each 256-byte
    // row pair of the next panel (the last panel fetches its own bytes again, a no-op).
    const uint16_t* next = j0 + kPanelCols < n ? panel + kPanelCols * Kp : panel;
    for (int64_t i = 0, blk = 0; i < M; i += kRowsPerBlock, ++blk) {
      const uint16_t* a = A + i * lda;
      const uint16_t* pf = next + (blk % 4) * (kPanelValues / 4);
      float* c = C + i * ldc + j0;
      switch (std::min<int64_t>(kRowsPerBlock, M - i)) {
        case 6: panel_rows<6>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
        case 5: panel_rows<5>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
        case 4: panel_rows<4>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
        case 3: panel_rows<3>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
        case 2: panel_rows<2>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
        default: panel_rows<1>(K, a, lda, panel, pf, accumulate, c, ldc, mask); break;
      }
    }
  }
}

}  // namespace

void gemm_bf16_packed_serial(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                             int64_t lda, const uint16_t* Bp, float beta, float* C, int64_t ldc) {
  MOE_ASSERT((beta == 0.0f || beta == 1.0f) && n0 % kPanelCols == 0);
  if (M <= 0 || n <= 0) return;
  if (K <= 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  if (amx_kernels() && M >= cpu().amx_min_rows)
    gemm_bf16_packed_amx(!amx_hardware(), M, n0, n, K, A, lda, Bp, beta, C, ldc);
  else if (packed_bf16_native())
    gemm_native(M, n0, n, K, A, lda, Bp, beta != 0.0f, C, ldc);
  else
    gemm_bf16_packed_widened(M, n0, n, K, A, lda, Bp, beta, C, ldc);
}

void gemm_bf16_packed_avx512(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                             int64_t lda, const uint16_t* Bp, float beta, float* C,
                             int64_t ldc) {
  MOE_ASSERT((beta == 0.0f || beta == 1.0f) && n0 % kPanelCols == 0 && K > 0);
  gemm_native(M, n0, n, K, A, lda, Bp, beta != 0.0f, C, ldc);
}

void gemm_bf16_packed_amx(bool emulated, int64_t M, int64_t n0, int64_t n, int64_t K,
                          const uint16_t* A, int64_t lda, const uint16_t* Bp, float beta,
                          float* C, int64_t ldc) {
  MOE_ASSERT((beta == 0.0f || beta == 1.0f) && n0 % kPanelCols == 0 && K > 0);
  const int64_t Kp = padded_k(K);
  AmxGemmArgs g;
  g.M = M;
  g.n = n;
  g.kbytes = Kp * 2;
  g.A = reinterpret_cast<const uint8_t*>(A);
  g.lda = lda * 2;
  g.a_bytes = K * 2;
  g.pad = 0;
  g.B = reinterpret_cast<const uint8_t*>(Bp + n0 * Kp);
  g.panel_bytes = Kp * kPanelCols * 2;
  g.accumulate = beta != 0.0f;
  g.C = C;
  g.ldc = ldc;
  amx_gemm_run(g, AmxOp::bf16, emulated);
}

void gemm_bf16_packed_widened(int64_t M, int64_t n0, int64_t n, int64_t K, const uint16_t* A,
                              int64_t lda, const uint16_t* Bp, float beta, float* C,
                              int64_t ldc) {
  if (M <= 0 || n <= 0) return;
  thread_local std::vector<float> a, b;
  a.resize(static_cast<size_t>(M * K));
  b.resize(static_cast<size_t>(K * n));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = 0; p < K; ++p) a[i * K + p] = from_bf16(A[i * lda + p]);
  for (int64_t p = 0; p < K; ++p)
    for (int64_t j = 0; j < n; ++j) b[p * n + j] = from_bf16(Bp[packed_bf16_index(K, p, n0 + j)]);
  gemm_f32_serial(false, false, M, n, K, 1.0f, a.data(), K, b.data(), n, beta, C, ldc);
}

}  // namespace moe::detail
