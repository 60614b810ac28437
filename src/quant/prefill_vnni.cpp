// Prefill of 4-bit codes on AVX512-VNNI (quant/kernels.hpp, "prefill, avx512_vnni"): the rows
// quantized to int8 per 128 values, each weight panel widened once per call into the signed
// bytes it holds exactly (int4: code − zero point; mxfp4: 2·E2M1), in the u8·s8 panel layout
// of experts/int8.hpp (per group of 4 values of K, 64 columns × 4 bytes), and the products
// summed by vpdpbusd exactly in int32, one conversion to fp32 per scale block.
//
// For a row x (kernel K order, zero beyond K) and column j, per block g of G = min(block_k, 128)
// values (the rows' scale r is constant on it, so is the weight's s):
//   C[i][j] = Σ_g (r_i,c(g) · s_j,g) · Σ_{k ∈ g} qx_k · v_kj,
// where qx are the rows' int8 values. vpdpbusd takes the rows as unsigned bytes qx + 128, so
// the block's sum comes out as Σ (qx + 128) · v − 128 · Σ v, with the column sums Σ_{k∈g} v
// made while widening (over the same padded K, so the padding cancels exactly). Every C
// element is the same instructions over its blocks in order whatever M, the row block or the
// thread: a row's bits do not depend on which call computed it.
//
// mxfp4 (a scale per 32 values) on a 128-value block: where a column's four E8M0 exponents e_L
// of a chunk lie within 3 of their least, e_min, the panel holds 2·E2M1 · 2^(e_L − e_min) (at
// most 12 · 8 = 96, still an exact signed byte) and the block's scale is 2^(e_min − 127) / 2:
// the same products, one conversion per 128 values instead of four. A panel where some column's
// chunk spreads wider (or holds a NaN scale) keeps blocks of 32. The choice depends on the
// weights of the panel alone, so a row's bits still do not depend on M or the thread.
//
// Why int8 and not bf16 here: on AVX-512 without AMX a vpdpbusd does 64 products to a
// vdpbf16ps's 32, and the codes need no lookup or scale multiply to become its operands
// (docs/quant.md, "Prefill"). On an AMX CPU prefill keeps the bf16 panels and AMX tiles.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "quant/kernels_impl.hpp"
#include "quant/transpose_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MOE_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))

namespace moe::detail::quant_impl {

namespace {

constexpr int64_t kCols = kPanelCols;  // a panel's columns
constexpr int64_t kStep = 4 * kCols;   // bytes of one K step (4 values) of a panel
constexpr int64_t kAhead = 16;         // chunks the widening prefetches ahead (a column group)


// The zero points of column j over chunk ch as bytes: lane L (32 values) holds its block's.
template <Codes Cd>
MOE_VNNI inline __m512i zero_bytes(const QuantMatrix& W, int64_t j, int64_t ch) {
  if constexpr (Cd != Codes::int4_zp) {
    return _mm512_set1_epi8(Cd == Codes::int4_sym ? 8 : 0);
  } else {
    const uint8_t* z = W.zeros + j * W.zero_stride;
    if (W.block_k >= kQuantChunk) return _mm512_set1_epi8(static_cast<char>(z[kQuantChunk * ch / W.block_k]));
    const int64_t last = W.blocks_k() - 1;
    int32_t l[4];
    for (int L = 0; L < 4; ++L)
      l[L] = static_cast<int32_t>(0x01010101u *
                                  z[std::min(last, (kQuantChunk * ch + 32 * L) / W.block_k)]);
    return _mm512_setr_epi32(l[0], l[0], l[0], l[0], l[1], l[1], l[1], l[1], l[2], l[2], l[2],
                             l[2], l[3], l[3], l[3], l[3]);
  }
}

// mxfp4's shared exponents of the panel of columns [j0, j0 + nc) and K [k0, k0 + kc): per chunk
// cl and column c, idx[cl·64 + c] is the permutation of the four shifted tables that gives each
// sub-block L (128-bit lane L) its table 2^(e_L − e_min) · 2·E2M1 (qword pairs 2d_L, 2d_L + 1),
// and emin[cl·64 + c] the chunk's least exponent. False (the panel keeps blocks of 32) when a
// chunk's exponents spread more than 3 or one is NaN (0xff).
bool mxfp4_shared_exponents(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                            uint64_t* idx, uint8_t* emin) {
  const int64_t S = W.sub_blocks(), chunks = (kc + kQuantChunk - 1) / kQuantChunk;
  const auto* scales = static_cast<const uint8_t*>(W.scales);
  constexpr uint64_t kLaneZero = 0x0100010001000100ull;  // every lane from lane 0: d_L = 0
  for (int64_t cl = 0; cl < chunks; ++cl) {
    const int64_t ch = k0 / kQuantChunk + cl, nsub = std::min<int64_t>(4, S - 4 * ch);
    for (int64_t c = 0; c < kCols; ++c) {
      idx[cl * kCols + c] = kLaneZero;
      emin[cl * kCols + c] = 0;
      if (c >= nc) continue;
      const uint8_t* e = scales + (j0 + c) * W.scale_stride + 4 * ch;
      uint8_t lo = 0xff, hi = 0;
      for (int64_t L = 0; L < nsub; ++L) {
        lo = std::min(lo, e[L]);
        hi = std::max(hi, e[L]);
      }
      if (hi == 0xff || hi - lo > 3) return false;
      uint64_t d = 0;
      for (int64_t L = 0; L < nsub; ++L) d |= static_cast<uint64_t>(2 * (e[L] - lo)) << (16 * L);
      idx[cl * kCols + c] = kLaneZero + d * 0x101;  // bytes 2L, 2L + 1: 2d_L, 2d_L + 1
      emin[cl * kCols + c] = lo;
    }
  }
  return true;
}

// The panel of columns [j0, j0 + nc) and K [k0, k0 + kc) (k0 a multiple of 128): per group of
// 4 values of K a 256-byte step (column c's 4 bytes at 4c), whole chunks of 128 (what lies
// past K or past the column's bytes is read as code 0: its value meets a zero row and is in
// the column sum alike); columns ≥ nc are zero. Per block g of the panel: cs[64g + c] =
// 128 · Σ v over the block, sc[64g + c] = the weight's scale (× 1/2 for mxfp4's doubled values).
// Shared (mxfp4, G = 128): the values and scales of mxfp4_shared_exponents' idx and emin.
template <Codes Cd, int G, bool Shared = false>
MOE_VNNI void widen_s8(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                       int8_t* panel, int32_t* cs, float* sc, const uint64_t* idx = nullptr,
                       const uint8_t* emin = nullptr) {
  static_assert(!Shared || (Cd == Codes::mxfp4 && G == kQuantChunk));
  const int64_t S = W.sub_blocks();
  const int64_t chunks = (kc + kQuantChunk - 1) / kQuantChunk, per_chunk = kQuantChunk / G;
  const __m512i nib = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
  // mxfp4: 2·E2M1 of each code as a signed byte; lane d of `shifted` holds it times 2^d.
  const __m128i e2m1_128 = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m512i e2m1 = _mm512_broadcast_i32x4(e2m1_128);
  const __m128i x2 = _mm_add_epi8(e2m1_128, e2m1_128), x4 = _mm_add_epi8(x2, x2),
                x8 = _mm_add_epi8(x4, x4);
  const __m512i shifted = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_set_m128i(x2, e2m1_128)), _mm256_set_m128i(x8, x4), 1);
  for (int64_t c0 = 0; c0 < kCols; c0 += 16) {
    for (int64_t cl = 0; cl < chunks; ++cl) {
      const int64_t ch = k0 / kQuantChunk + cl, nsub = std::clamp<int64_t>(S - 4 * ch, 0, 4);
      // The codes stream from memory, 16 columns at a time: ask for the chunk kAhead on in
      // the order (column group, chunk) they are read.
      {
        const int64_t next = (c0 / 16) * chunks + cl + kAhead;
        const int64_t nc0 = next / chunks * 16, ach = k0 / kQuantChunk + next % chunks;
        for (int64_t i = 0; i < 16 && nc0 + i < nc; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(W.codes + (j0 + nc0 + i) * W.code_stride + 64 * ach),
                       _MM_HINT_T0);
      }
      __m512i D0[16], D1[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (c0 + i >= nc || nsub == 0) {
          D0[i] = D1[i] = _mm512_setzero_si512();
          continue;
        }
        const int64_t j = j0 + c0 + i;
        const uint8_t* p = W.codes + j * W.code_stride + 64 * ch;
        const __m512i v = nsub == 4 ? _mm512_loadu_si512(p)
                                    : _mm512_maskz_loadu_epi8(~0ull >> (64 - 16 * nsub), p);
        __m512i lo = _mm512_and_si512(v, nib);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        if constexpr (Shared) {
          const __m512i table = _mm512_permutexvar_epi64(
              _mm512_cvtepu8_epi64(_mm_loadl_epi64(
                  reinterpret_cast<const __m128i*>(idx + cl * kCols + c0 + i))),
              shifted);
          lo = _mm512_shuffle_epi8(table, lo);
          hi = _mm512_shuffle_epi8(table, hi);
        } else if constexpr (Cd == Codes::mxfp4) {
          lo = _mm512_shuffle_epi8(e2m1, lo);
          hi = _mm512_shuffle_epi8(e2m1, hi);
        } else {
          const __m512i z = zero_bytes<Cd>(W, j, ch);
          lo = _mm512_sub_epi8(lo, z);
          hi = _mm512_sub_epi8(hi, z);
        }
        // Lane L of each: bytes 16L .. 16L + 7 (D0) or 16L + 8 .. 15 (D1) as values in K order.
        D0[i] = _mm512_unpacklo_epi8(lo, hi);
        D1[i] = _mm512_unpackhi_epi8(lo, hi);
      }
      transpose_16x16(D0);
      transpose_16x16(D1);
      // D0[t]: step 8·(t / 4) + t % 4 of the chunk; D1[t]: the 4 after each of those.
      __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      int8_t* base = panel + (cl * 32) * kStep + 4 * c0;
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const int s0 = 8 * (t / 4) + t % 4, s1 = s0 + 4;
        _mm512_storeu_si512(base + s0 * kStep, D0[t]);
        _mm512_storeu_si512(base + s1 * kStep, D1[t]);
        // Steps s0 and s1 (values 4s .. 4s + 3 of the chunk) lie in block 4·s0 / G of it.
        constexpr int per_block = G / 8;
        sum[t / per_block] = _mm512_dpbusd_epi32(sum[t / per_block], ones, D0[t]);
        sum[t / per_block] = _mm512_dpbusd_epi32(sum[t / per_block], ones, D1[t]);
      }
      for (int64_t g = 0; g < per_chunk; ++g)
        _mm512_storeu_si512(cs + (cl * per_chunk + g) * kCols + c0, _mm512_slli_epi32(sum[g], 7));
    }
  }
  // The scales per block and column (a column's scales are contiguous along K).
  const int64_t groups = chunks * per_chunk, last = W.blocks_k() - 1;
  int64_t block[kQuantPanelK / 32];
  for (int64_t g = 0; g < groups; ++g) block[g] = std::min(last, (k0 + g * G) / W.block_k);
  std::fill(sc, sc + groups * kCols, 0.0f);
  const float* e8m0 = e8m0_table();
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t row = (j0 + c) / W.fmt().block_n * W.scale_stride;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = block[g];
      if constexpr (Shared)
        sc[g * kCols + c] = 0.5f * e8m0[emin[g * kCols + c]];
      else if constexpr (Cd == Codes::mxfp4)  // × 1/2: the panel holds 2·E2M1
        sc[g * kCols + c] = 0.5f * e8m0[static_cast<const uint8_t*>(W.scales)[row + b]];
      else
        sc[g * kCols + c] = _cvtsh_ss(static_cast<const uint16_t*>(W.scales)[row + b]);
    }
  }
}

using WidenFn = void (*)(const QuantMatrix&, int64_t, int64_t, int64_t, int64_t, int8_t*,
                         int32_t*, float*, const uint64_t*, const uint8_t*);
template <Codes Cd>
WidenFn widen_for_block(int64_t G) {
  return G == 32 ? widen_s8<Cd, 32> : G == 64 ? widen_s8<Cd, 64> : widen_s8<Cd, 128>;
}
WidenFn widen_for(const QuantMatrix& W) {
  const int64_t G = std::min<int64_t>(W.block_k, kQuantChunk);
  switch (codes_of(W)) {
    case Codes::int4_sym: return widen_for_block<Codes::int4_sym>(G);
    case Codes::int4_zp: return widen_for_block<Codes::int4_zp>(G);
    case Codes::mxfp4: return widen_for_block<Codes::mxfp4>(G);
    case Codes::fp8: break;
  }
  MOE_ASSERT(!"avx512_vnni reads 4-bit codes only");
  return nullptr;
}

// C rows (MR, nc ≤ 64) += (or =, first) the panel's blocks [0, groups) of G values against MR
// rows A (u8, stride lda, at the panel's first value) whose scales per chunk are
// rs[r·rs_ld + c0 + chunk].
template <int MR>
MOE_VNNI void tile_blocks(const uint8_t* A, int64_t lda, const float* rs, int64_t rs_ld,
                          int64_t c0, const int8_t* B, const int32_t* cs, const float* sc,
                          int64_t groups, int64_t G, float* C, int64_t ldc, int64_t nc,
                          bool first) {
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v)
    m[v] = static_cast<__mmask16>(nc >= 16 * (v + 1) ? 0xffff
                                  : nc <= 16 * v     ? 0
                                                     : (1u << (nc - 16 * v)) - 1u);
  const int64_t steps = G / 4;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i c[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_si512();
    const int8_t* Bg = B + g * steps * kStep;
    const uint8_t* Ag = A + g * G;
    for (int64_t s = 0; s < steps; ++s) {
      const int8_t* b = Bg + s * kStep;
      const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64),
                    b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, Ag + r * lda + 4 * s, 4);
        const __m512i a = _mm512_set1_epi32(a4);
        c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
        c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
        c[r][2] = _mm512_dpbusd_epi32(c[r][2], a, b2);
        c[r][3] = _mm512_dpbusd_epi32(c[r][3], a, b3);
      }
    }
    // Through memory (L1): converted in the same loop, GCC 12 kept c[][] on the stack in the
    // loop above as well (a store per vpdpbusd), at a third of the speed.
    alignas(64) int32_t acc[MR][4][16];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) _mm512_store_si512(acc[r][v], c[r][v]);
    const int64_t chunk = c0 + g * G / kQuantChunk;
    const bool init = first && g == 0;
    for (int v = 0; v < 4; ++v) {
      const __m512i csv = _mm512_loadu_si512(cs + g * kCols + 16 * v);
      const __m512 scv = _mm512_loadu_ps(sc + g * kCols + 16 * v);
      for (int r = 0; r < MR; ++r) {
        const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc[r][v]), csv));
        const __m512 s = _mm512_mul_ps(scv, _mm512_set1_ps(rs[r * rs_ld + chunk]));
        float* out = C + r * ldc + 16 * v;
        const __m512 y = init ? _mm512_mul_ps(x, s)
                              : _mm512_fmadd_ps(x, s, _mm512_maskz_loadu_ps(m[v], out));
        _mm512_mask_storeu_ps(out, m[v], y);
      }
    }
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, const int8_t*,
                        const int32_t*, const float*, int64_t, int64_t, float*, int64_t, int64_t,
                        bool);
constexpr TileFn kTiles[] = {tile_blocks<1>, tile_blocks<2>, tile_blocks<3>,
                             tile_blocks<4>, tile_blocks<5>, tile_blocks<6>};
constexpr int64_t kMaxRows = 6;  // 6 × 4 int32 accumulators, 4 panel vectors, 1 broadcast

}  // namespace

namespace {
// The panel's values of K (whole chunks) and its blocks, for the largest panel of W.
int64_t panel_values(const QuantMatrix& W) {
  return (std::min(W.K, kQuantPanelK) + kQuantChunk - 1) / kQuantChunk * kQuantChunk;
}
int64_t block_values(const QuantMatrix& W) { return std::min<int64_t>(W.block_k, kQuantChunk); }

// The bytes of the panel, then of its column sums (int32) and scales (fp32) per block of 64
// columns; mxfp4 then has mxfp4_shared_exponents' idx (8 bytes) and emin per chunk and column.
int64_t panel_bytes(const QuantMatrix& W) { return panel_values(W) / 4 * kStep; }
int64_t block_bytes(const QuantMatrix& W) {
  return panel_values(W) / block_values(W) * kCols * 8;
}
int64_t shared_bytes(const QuantMatrix& W) {
  return W.format == QuantFormatId::mxfp4 ? panel_values(W) / kQuantChunk * kCols * 9 : 0;
}
}  // namespace

int64_t prefill_vnni_workspace_bytes(const QuantMatrix& W) {
  return panel_bytes(W) + block_bytes(W) + shared_bytes(W);
}

namespace {
// quant_s8_scale of n values (a multiple of 16): max |v| / 127, NaN when a value is NaN.
MOE_VNNI inline float s8_scale(const float* v, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 x = _mm512_loadu_ps(v + k);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    amax = _mm512_max_ps(amax, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude)));
  }
  return nan ? __builtin_nanf("") : _mm512_reduce_max_ps(amax) / 127.0f;
}
// quant_s8 of 16 values at v with scale s: nearest even of v / s, clamped to ±127 (NaN → 127:
// min returns its second operand); 0 where s is 0.
MOE_VNNI inline __m512i s8_values(const float* v, float s) {
  if (s == 0.0f) return _mm512_setzero_si512();
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v), _mm512_set1_ps(s)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(
      _mm512_max_ps(_mm512_min_ps(r, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-127.0f)));
}
}  // namespace

MOE_VNNI void prefill_vnni_rows(const float* v, int64_t ld, uint8_t* dst, float* scales) {
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t c = 0; c < ld; c += kQuantChunk) {
    const float s = s8_scale(v + c, kQuantChunk);
    scales[c / kQuantChunk] = s;
    for (int64_t k = 0; k < kQuantChunk; k += 16)  // the u8 offset
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c + k),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(s8_values(v + c + k, s), off)));
  }
}

MOE_VNNI void tiled_vnni_rows(const float* v, int64_t ld, int64_t G, float half, float zero,
                              int8_t* dst, float* scales, float* sums) {
  MOE_ASSERT(G == 32 || G == 64 || G == 128);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t per = G / 16;  // vectors a block
  for (int64_t c = 0; c < ld; c += kQuantChunk) {
    __m512i q[8];
    for (int64_t b = 0; b < 8 / per; ++b) {
      const float s = s8_scale(v + c + b * G, G);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t u = 0; u < per; ++u) {
        q[b * per + u] = s8_values(v + c + (b * per + u) * 16, s);
        sum = _mm512_add_epi32(sum, q[b * per + u]);
      }
      const int64_t at = (c + b * G) / G;
      scales[at] = s * half;
      sums[at] = static_cast<float>(_mm512_reduce_add_epi32(sum));
      if (zero != 0.0f) sums[at] *= zero * scales[at];
    }
    // Per chunk the even values, then the odd ones (even_then_odd).
    for (int j = 0; j < 4; ++j) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c + 16 * j),
                       _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2 * j], even, q[2 * j + 1])));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c + 64 + 16 * j),
                       _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2 * j], odd, q[2 * j + 1])));
    }
  }
}

void prefill_vnni_serial(const QuantMatrix& W, const QuantRows& rows, int64_t n0, int64_t n,
                         float* C, int64_t ldc, unsigned char* ws, QuantNext next) {
  MOE_ASSERT(rows.method == QuantMethod::prefill && rows.path == QuantPath::avx512_vnni &&
             W.fmt().code_bits == 4);
  const int64_t chunks = rows.ld / kQuantChunk;
  auto* panel = reinterpret_cast<int8_t*>(ws);
  auto* cs = reinterpret_cast<int32_t*>(ws + panel_bytes(W));
  auto* idx = reinterpret_cast<uint64_t*>(ws + panel_bytes(W) + block_bytes(W));
  auto* emin = reinterpret_cast<uint8_t*>(idx + panel_values(W) / kQuantChunk * kCols);
  const auto* A = static_cast<const uint8_t*>(rows.data);
  const WidenFn widen = widen_for(W);
  const bool mxfp4 = W.format == QuantFormatId::mxfp4;
  const int64_t blocks = (rows.M + kMaxRows - 1) / kMaxRows;
  for (int64_t j = 0; j < n; j += kCols) {
    const int64_t nc = std::min(kCols, n - j);
    for (int64_t k0 = 0; k0 < W.K; k0 += kQuantPanelK) {
      const int64_t kc = std::min(kQuantPanelK, W.K - k0);
      const bool shared = mxfp4 && mxfp4_shared_exponents(W, n0 + j, nc, k0, kc, idx, emin);
      const int64_t G = shared ? kQuantChunk : block_values(W);
      const int64_t groups = (kc + kQuantChunk - 1) / kQuantChunk * (kQuantChunk / G);
      float* sc = reinterpret_cast<float*>(cs + groups * kCols);
      (shared ? widen_s8<Codes::mxfp4, kQuantChunk, true> : widen)(W, n0 + j, nc, k0, kc, panel,
                                                                   cs, sc, idx, emin);
      // The next panel (of this call, else the caller's next): asked for a part per row block.
      const QuantPanel after = next_panel(W, n0, n, j, k0, next);
      // Row blocks as even as possible (at most 6 rows each).
      for (int64_t bi = 0, i0 = 0; bi < blocks; ++bi) {
        prefetch_panel(after, bi, blocks);
        const int64_t m = (rows.M - i0) / (blocks - bi);
        kTiles[m - 1](A + i0 * rows.ld + k0, rows.ld, rows.scales + i0 * chunks, chunks,
                      k0 / kQuantChunk, panel, cs, sc, groups, G, C + i0 * ldc + j, ldc, nc,
                      k0 == 0);
        i0 += m;
      }
    }
  }
}

bool prefill_vnni_mxfp4_shared(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0,
                               int64_t kc) {
  MOE_ASSERT(W.format == QuantFormatId::mxfp4 && nc <= kCols && kc <= kQuantPanelK);
  uint64_t idx[kQuantPanelK / kQuantChunk * kCols];
  uint8_t emin[kQuantPanelK / kQuantChunk * kCols];
  return mxfp4_shared_exponents(W, j0, nc, k0, kc, idx, emin);
}

void prefetch_panel(const QuantPanel& p, int64_t part, int64_t parts) {
  if (p.n <= 0) return;
  const QuantMatrix& W = *p.W;
  const int64_t j0 = p.j, nc = p.n, k0 = p.k, kc = p.kc;
  const bool four = W.fmt().code_bits == 4;
  const int64_t b0 = four ? k0 / 2 : k0;
  const int64_t b1 = four ? std::min((k0 + kc + 1) / 2, W.sub_blocks() * 16) : k0 + kc;
  const int64_t per_col = (b1 - b0 + 63) / 64, lines = nc * per_col;
  const int64_t from = lines * part / parts, to = lines * (part + 1) / parts;
  for (int64_t c = from / per_col, l = from % per_col, done = from; done < to; ++c, l = 0) {
    const uint8_t* col = W.codes + (j0 + c) * W.code_stride + b0;
    for (; l < per_col && done < to; ++l, ++done)
      _mm_prefetch(reinterpret_cast<const char*>(col + 64 * l), _MM_HINT_T1);
  }
  if (part + 1 == parts) {  // the scales (and zero points): a line or two a column
    const QuantFormat& f = W.fmt();
    const int64_t sb = f.scale == QuantScale::e8m0 ? 1 : f.scale == QuantScale::f16 ? 2 : 4;
    for (int64_t c = 0; c < nc; c += f.block_n) {
      const auto* sp = static_cast<const uint8_t*>(W.scales) +
                       ((j0 + c) / f.block_n * W.scale_stride + k0 / W.block_k) * sb;
      _mm_prefetch(reinterpret_cast<const char*>(sp), _MM_HINT_T1);
      if (W.zero_points)
        _mm_prefetch(reinterpret_cast<const char*>(W.zeros + (j0 + c) * W.zero_stride + k0 / W.block_k),
                     _MM_HINT_T1);
    }
  }
}

}  // namespace moe::detail::quant_impl
