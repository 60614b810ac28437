// The AVX-512 kernels of quant/kernels.hpp: decode with bf16 rows (vdpbf16ps) or fp32 rows
// (vfmadd), and the panel widening of prefill. Each function carries its own target: the build
// targets x86-64-v3, and these run only where cpu() allows them.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "quant/kernels_impl.hpp"
#include "quant/transpose_avx512.hpp"

// GCC 12's AVX-512 intrinsics pass an undefined merge source, which its
// -W(maybe-)uninitialized reports inside its own header (as in common/philox.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MOE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
#define MOE_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2")))
#define MOE_AVX512_BF16_VBMI                                                                  \
  __attribute__((target(                                                                    \
      "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c,bmi2")))
#define MOE_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))
#define MOE_AVX512_VNNI_VBMI                                                                  \
  __attribute__((target(                                                                    \
      "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c,bmi2")))

namespace moe::detail::quant_impl {

namespace {

// ---- one format's codes, scales and zero points (the rows of kQuantFormats) -----------------

// The code tables in registers: 4-bit formats use t[0], 8-bit ones t[0..3].
struct Tables {
  __m512i t[4];
};

MOE_AVX512 inline Tables load_tables(QuantFormatId id) {
  const uint16_t* w = bf16_code_table(id);
  Tables T;
  for (int i = 0; i < 4; ++i) T.t[i] = _mm512_loadu_si512(w + 32 * i);
  return T;
}

// Per (column, block): the scale as fp32 and, for linear codes, the table index offset
// 16 − zero as words.
struct BlockParams {
  float scale;
  int offset;
};

template <Codes Cd>
MOE_AVX512 inline BlockParams block_params(const QuantMatrix& W, int64_t j, int64_t b) {
  if constexpr (Cd == Codes::int4_sym || Cd == Codes::int4_zp) {
    const uint16_t h = static_cast<const uint16_t*>(W.scales)[j * W.scale_stride + b];
    const int z = Cd == Codes::int4_zp ? W.zeros[j * W.zero_stride + b] : 8;
    return {_cvtsh_ss(h), 16 - z};
  } else if constexpr (Cd == Codes::mxfp4) {
    return {e8m0_table()[static_cast<const uint8_t*>(W.scales)[j * W.scale_stride + b]], 0};
  } else {
    return {static_cast<const float*>(W.scales)[(j / 128) * W.scale_stride + b], 0};
  }
}

// The weights stream from memory once: each column's read fetches into L2 the same place
// 8 KiB further on (whole tiles of NC columns later, which sit right after this tile's when
// the columns are adjacent, as every stored layout has them). Measured on one Zen 4 core,
// int4 K 2048 × N 768 cold: no prefetch 8.0 GB/s, into L1 4 KiB ahead 11.2, into L2 8 KiB
// ahead 17.6 (the same kernel hot: 20).
constexpr int64_t kPrefetchBytes = 8192;
inline int64_t prefetch_columns(const QuantMatrix& W, int NC) {
  const int64_t tile = NC * W.code_stride;
  return (kPrefetchBytes + tile - 1) / tile * NC;
}
MOE_AVX512 inline void prefetch_l1(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}
MOE_AVX512 inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}
// The tile that far ahead, fetched in address order: step (chunk ch, column c) of a tile of NC
// columns asks for `bytes` bytes (a chunk of one column: 64 for 4-bit codes, 128 for 8-bit) at
// offset (ch·NC + c)·bytes of it, so its lines arrive front to back as one stream rather than
// as NC short streams one code_stride apart. The steps cover the tile, as code_stride ≤
// chunks · bytes in every layout. A Qwen3-30B-A3B int4 decode step ran 13% faster so, fp8 7%
// (docs/quant.md, "Decode").
template <int NC>
MOE_AVX512 inline void prefetch_in_order(const uint8_t* tile_ahead, int64_t ch, int c,
                                         int64_t bytes) {
  const uint8_t* p = tile_ahead + (ch * NC + c) * bytes;
  for (int64_t b = 0; b < bytes; b += 64) prefetch(p + b);
}

// 32 codes of sub-block s of a column (col: its first byte) → 32 bf16 words in k order.
// 4-bit: byte i → dword i = (low nibble) | (high nibble) << 16, then one vpermw through the
// table. 8-bit: bytes → words, two vpermi2w (magnitudes 0..63, 64..127), the sign bit back.
template <Codes Cd>
MOE_AVX512 inline __m512i widen_bf16(const uint8_t* col, int64_t s, int64_t K, const Tables& T,
                                     __m512i offset) {
  if constexpr (Cd == Codes::fp8) {
    const uint8_t* p = col + 32 * s;
    const int64_t valid = K - 32 * s;
    const __m256i raw = valid >= 32
                            ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1u << valid) - 1u), p);
    const __m512i c = _mm512_cvtepu8_epi16(raw);
    const __m512i lo = _mm512_permutex2var_epi16(T.t[0], c, T.t[1]);
    const __m512i hi = _mm512_permutex2var_epi16(T.t[2], c, T.t[3]);
    const __mmask32 upper = _mm512_test_epi16_mask(c, _mm512_set1_epi16(0x40));
    const __m512i mag = _mm512_mask_blend_epi16(upper, lo, hi);
    // mag ^ (c << 8 & 0x8000): the code's sign bit onto the word's (the plain table's
    // magnitudes have no sign; a scaled table's may: bf16(−x) = −bf16(x) either way)
    return _mm512_ternarylogic_epi32(mag, _mm512_slli_epi16(c, 8),
                                     _mm512_set1_epi16(static_cast<short>(0x8000)), 0x78);
  } else {
    (void)K;
    const __m512i d =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + 16 * s)));
    // (d | d << 12) & 0x000f000f: the low nibble in the low word, the high one in the high word
    __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12),
                                            _mm512_set1_epi32(0x000f000f), 0xA8);
    if constexpr (Cd != Codes::mxfp4) idx = _mm512_add_epi16(idx, offset);
    return _mm512_permutexvar_epi16(idx, T.t[0]);
  }
}

// Words 0..15 / 16..31 of w as fp32 (bf16 → fp32 is a shift).
MOE_AVX512 inline __m512 bf16_lo_f32(__m512i w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
}
MOE_AVX512 inline __m512 bf16_hi_f32(__m512i w) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
}

// ---- decode with bf16 rows -----------------------------------------------------------------


// The 4-bit tables as two vpshufb byte tables (the low and the high bytes of the 16 bf16
// values, in every 128-bit lane): int4 symmetric reads q − 8, int4 with zero points q (the
// zero point comes off later), mxfp4 its E2M1 values.
struct NibbleTables {
  __m512i lo, hi;
};
MOE_AVX512 inline NibbleTables nibble_tables(const QuantMatrix& W) {
  const uint16_t* w = bf16_code_table(W.format);
  const int off = W.format == QuantFormatId::int4 ? (W.zero_points ? 16 : 8) : 0;
  alignas(16) uint8_t lo[16], hi[16];
  for (int q = 0; q < 16; ++q) {
    lo[q] = static_cast<uint8_t>(w[q + off] & 0xff);
    hi[q] = static_cast<uint8_t>(w[q + off] >> 8);
  }
  return {_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lo))),
          _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)))};
}

// Chunk ch (128 values, nsub ≤ 4 sub-blocks stored) of a column of 4-bit codes → 4 vectors of
// 32 bf16 values in the interleaved order (kernels_impl.hpp: interleaved_source).
MOE_AVX512 inline void widen_chunk4(const uint8_t* col, int64_t ch, int64_t nsub,
                                    const NibbleTables& T, __m512i w[4]) {
  const uint8_t* p = col + 64 * ch;
  const __m512i v = nsub >= 4 ? _mm512_loadu_si512(p)
                              : _mm512_maskz_loadu_epi8(~0ull >> (64 - 16 * nsub), p);
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(v, nib);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
  const __m512i a = _mm512_shuffle_epi8(T.lo, lo), b = _mm512_shuffle_epi8(T.hi, lo);
  const __m512i c = _mm512_shuffle_epi8(T.lo, hi), d = _mm512_shuffle_epi8(T.hi, hi);
  w[0] = _mm512_unpacklo_epi8(a, b);
  w[1] = _mm512_unpackhi_epi8(a, b);
  w[2] = _mm512_unpacklo_epi8(c, d);
  w[3] = _mm512_unpackhi_epi8(c, d);
}

// Chunk ch of a column of 8-bit codes → 4 vectors of 32 bf16 values in K order.
MOE_AVX512 inline void widen_chunk8(const uint8_t* col, int64_t ch, int64_t K, const Tables& T,
                                    __m512i w[4]) {
  #pragma GCC unroll 16
  for (int v = 0; v < 4; ++v) {
    const int64_t s = 4 * ch + v;
    w[v] = 32 * s < K ? widen_bf16<Codes::fp8>(col, s, K, T, _mm512_setzero_si512())
                      : _mm512_setzero_si512();
  }
}

// Lane group L (fp32 lanes 4L .. 4L + 3) of a chunk's vectors holds sub-block L (4-bit codes)
// or a share of all four (8-bit codes, whose blocks are whole chunks): `spread` maps each
// lane to its block among those the chunk touches.
MOE_AVX512 inline __m512i spread_index(int64_t block_k) {
  return block_k == 32   ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
         : block_k == 64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                         : _mm512_setzero_si512();
}

// Where a chunk's scales start and how many it reads: blocks of 32 or 64 give 4 or 2 per
// chunk, larger ones one per (block_k / 128) chunks. Kept as running counters (no division in
// the loop).
struct ChunkBlocks {
  int64_t per_chunk, chunks_per_block;  // per_chunk 0: blocks of 128 or more
  int64_t b0 = 0, seen = 0;             // the chunk's first block; chunks seen in it
  explicit ChunkBlocks(int64_t block_k)
      : per_chunk(block_k < kQuantChunk ? kQuantChunk / block_k : 0),
        chunks_per_block(block_k < kQuantChunk ? 1 : block_k / kQuantChunk) {}
  // The blocks a chunk of nsub sub-blocks touches, as a load mask.
  unsigned mask(int64_t nsub) const {
    const int64_t nb = per_chunk == 4 ? nsub : per_chunk == 2 ? (nsub + 1) >> 1 : 1;
    return (1u << nb) - 1u;
  }
  void next() {
    if (per_chunk) {
      b0 += per_chunk;
    } else if (++seen == chunks_per_block) {
      seen = 0;
      ++b0;
    }
  }
};

// The scales of a chunk (a column's scale row from block b0 on, `mask` of them), one per lane.
template <Codes Cd>
MOE_AVX512 inline __m512 chunk_scale(const void* row, int64_t b0, unsigned mask, bool one,
                                     __m512i spread) {
  if constexpr (Cd == Codes::fp8) {
    return _mm512_set1_ps(static_cast<const float*>(row)[b0]);
  } else if constexpr (Cd == Codes::mxfp4) {
    // E8M0 → fp32 bits s << 23; 0 is 2^-127 (a subnormal) and 255 NaN.
    const __m128i s = _mm_cvtepu8_epi32(
        _mm_maskz_loadu_epi8(static_cast<__mmask16>(mask), static_cast<const uint8_t*>(row) + b0));
    __m128i bits = _mm_slli_epi32(s, 23);
    bits = _mm_mask_mov_epi32(bits, _mm_cmpeq_epi32_mask(s, _mm_setzero_si128()),
                              _mm_set1_epi32(0x00400000));
    bits = _mm_mask_mov_epi32(bits, _mm_cmpeq_epi32_mask(s, _mm_set1_epi32(255)),
                              _mm_set1_epi32(0x7fc00000));
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(bits)));
  } else {
    const uint16_t* sc = static_cast<const uint16_t*>(row) + b0;
    if (one) return _mm512_set1_ps(_cvtsh_ss(*sc));
    const __m128 f = _mm_cvtph_ps(_mm_maskz_loadu_epi16(static_cast<__mmask8>(mask), sc));
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(f));
  }
}

// int4's zero points of a chunk, one per lane, as fp32.
MOE_AVX512 inline __m512 chunk_zero(const uint8_t* row, int64_t b0, unsigned mask, bool one,
                                    __m512i spread) {
  if (one) return _mm512_set1_ps(static_cast<float>(row[b0]));
  const __m128 f = _mm_cvtepi32_ps(
      _mm_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(mask), row + b0)));
  return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(f));
}

// A chunk of a column (four vectors of 32 bf16 values) against a row's 128 bf16 values at a:
// four vdpbf16ps into an fp32 chunk sum.
MOE_AVX512_BF16 __attribute__((always_inline)) inline __m512 chunk_dot_bf16(const uint16_t* a,
                                                                            const __m512i w[4]) {
  __m512 blk = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(a), (__m512bh)w[0]);
  blk = _mm512_dpbf16_ps(blk, (__m512bh)_mm512_loadu_si512(a + 32), (__m512bh)w[1]);
  blk = _mm512_dpbf16_ps(blk, (__m512bh)_mm512_loadu_si512(a + 64), (__m512bh)w[2]);
  return _mm512_dpbf16_ps(blk, (__m512bh)_mm512_loadu_si512(a + 96), (__m512bh)w[3]);
}

// MR rows × NC columns (j0 ..): per chunk, four vdpbf16ps sum a column's exact widened values
// against each row into an fp32 chunk sum; int4's zero points come off it (z · the row's lane
// sums), and the chunk's scales multiply it into the accumulators.
template <Codes Cd, int MR, int NC>
MOE_AVX512_BF16 void tile_bf16(const QuantMatrix& W, const NibbleTables& NT, const Tables& T,
                               const QuantRows& R, int64_t i0, int64_t j0, float* C, int64_t ldc) {
  constexpr bool four = Cd != Codes::fp8, zp = Cd == Codes::int4_zp;
  constexpr int64_t scale_size = Cd == Codes::fp8 ? 4 : Cd == Codes::mxfp4 ? 1 : 2;
  const int64_t S = W.sub_blocks(), chunks = (S + 3) / 4;
  const __m512i spread = spread_index(W.block_k);
  const int64_t ahead = prefetch_columns(W, NC) * W.code_stride;
  const uint16_t* A = static_cast<const uint16_t*>(R.data) + i0 * R.ld;
  const float* sums = zp ? R.sums + i0 * chunks * 16 : nullptr;
  const uint8_t* col[NC];
  const char* srow[NC];
  const uint8_t* zrow[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    const int64_t j = j0 + c;
    col[c] = W.codes + j * W.code_stride;
    srow[c] = static_cast<const char*>(W.scales) +
              (j / W.fmt().block_n) * W.scale_stride * scale_size;
    zrow[c] = zp ? W.zeros + j * W.zero_stride : nullptr;
  }
  __m512 acc[MR][NC];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  ChunkBlocks blocks(W.block_k);
  const bool one = blocks.per_chunk == 0;
  for (int64_t ch = 0; ch < chunks; ++ch, blocks.next()) {
    const int64_t nsub = std::min<int64_t>(4, S - 4 * ch);
    const unsigned mask = blocks.mask(nsub);
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      __m512i w[4];
      if constexpr (four) {
        prefetch_in_order<NC>(col[0] + ahead, ch, c, 64);
        widen_chunk4(col[c], ch, nsub, NT, w);
      } else {
        prefetch_in_order<NC>(col[0] + ahead, ch, c, 128);
        widen_chunk8(col[c], ch, W.K, T, w);
      }
      const __m512 sv = chunk_scale<Cd>(srow[c], blocks.b0, mask, one, spread);
      __m512 zv = _mm512_setzero_ps();
      if constexpr (zp) zv = chunk_zero(zrow[c], blocks.b0, mask, one, spread);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const uint16_t* a = A + m * R.ld + kQuantChunk * ch;
        __m512 blk = chunk_dot_bf16(a, w);
        if constexpr (zp) blk = _mm512_fnmadd_ps(zv, _mm512_loadu_ps(sums + (m * chunks + ch) * 16), blk);
        acc[m][c] = _mm512_fmadd_ps(blk, sv, acc[m][c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) C[m * ldc + c] = _mm512_reduce_add_ps(acc[m][c]);
}

// Columns per tile for MR rows: MR·NC accumulators beside a column's four widened vectors,
// its scales and the tables, in the 32 registers.
constexpr int nc_bf16(int MR) { return MR <= 2 ? 8 : std::max(1, std::min(8, 20 / MR)); }

template <Codes Cd, int MR>
MOE_AVX512_BF16 void rows_bf16(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t n0,
                               int64_t n, float* C, int64_t ldc) {
  constexpr int NC = nc_bf16(MR);
  const NibbleTables NT = nibble_tables(W);
  const Tables T = load_tables(W.format);
  int64_t j = 0;
  for (; j + NC <= n; j += NC) tile_bf16<Cd, MR, NC>(W, NT, T, R, i0, n0 + j, C + j, ldc);
  for (; j < n; ++j) tile_bf16<Cd, MR, 1>(W, NT, T, R, i0, n0 + j, C + j, ldc);
}

template <Codes Cd, int... MR>
void rows_bf16_m(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc, std::integer_sequence<int, MR...>) {
  // MR = 1 .. 16: the call whose MR is M.
  ((M == MR + 1 ? rows_bf16<Cd, MR + 1>(W, R, i0, n0, n, C, ldc) : void()), ...);
}

// ---- fp8 decode with bf16 rows, widened by vpermi2b ----------------------------------------

// E4M3's bf16 words as byte tables for vpermi2b: the low bytes and the high bytes (without the
// sign, which the code's bit 7 gives) of the 128 magnitudes, two registers each.
struct Fp8ByteTables {
  __m512i lo[2], hi[2];
};
MOE_AVX512 inline Fp8ByteTables fp8_byte_tables() {
  struct Bytes {
    alignas(64) uint8_t lo[128], hi[128];
  };
  static const Bytes t = [] {  // made once from the code table
    const uint16_t* w = bf16_code_table(QuantFormatId::fp8);
    Bytes b;
    for (int i = 0; i < 128; ++i) {
      b.lo[i] = static_cast<uint8_t>(w[i] & 0xff);
      b.hi[i] = static_cast<uint8_t>(w[i] >> 8);
    }
    return b;
  }();
  return {{_mm512_load_si512(t.lo), _mm512_load_si512(t.lo + 64)},
          {_mm512_load_si512(t.hi), _mm512_load_si512(t.hi + 64)}};
}

// 64 codes at p (n of them stored; zero beyond) → two vectors of 32 bf16 words, vpunpcklbw and
// vpunpckhbw of their table bytes (interleaved8_source gives the order): two lookups, a sign
// and two unpacks where vpermi2w took a widening, two lookups, a blend and a sign per 32.
MOE_AVX512_BF16_VBMI inline void widen64_fp8(const uint8_t* p, int64_t n, const Fp8ByteTables& T,
                                             __m512i& a, __m512i& b) {
  const __m512i c = n >= 64 ? _mm512_loadu_si512(p)
                            : _mm512_maskz_loadu_epi8(n <= 0 ? 0 : ~0ull >> (64 - n), p);
  const __m512i lo = _mm512_permutex2var_epi8(T.lo[0], c, T.lo[1]);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(T.hi[0], c, T.hi[1]), c,
                                               _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  a = _mm512_unpacklo_epi8(lo, hi);
  b = _mm512_unpackhi_epi8(lo, hi);
}

// tile_bf16 for fp8 with rows in interleaved8 order: per chunk and column, four vdpbf16ps per
// row into an fp32 chunk sum, times the 128 × 128 block's scale into the accumulators.
template <int MR, int NC>
MOE_AVX512_BF16_VBMI void tile_fp8_vbmi(const QuantMatrix& W, const Fp8ByteTables& T,
                                        const QuantRows& R, int64_t i0, int64_t j0, float* C,
                                        int64_t ldc) {
  const int64_t chunks = R.ld / kQuantChunk;
  const int64_t ahead = prefetch_columns(W, NC) * W.code_stride;
  const uint16_t* A = static_cast<const uint16_t*>(R.data) + i0 * R.ld;
  const uint8_t* col[NC];
  const float* srow[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    col[c] = W.codes + (j0 + c) * W.code_stride;
    srow[c] = static_cast<const float*>(W.scales) + ((j0 + c) / W.fmt().block_n) * W.scale_stride;
  }
  __m512 acc[MR][NC];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t left = W.K - kQuantChunk * ch, b = ch * kQuantChunk / W.block_k;
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      prefetch_in_order<NC>(col[0] + ahead, ch, c, 128);
      __m512i w[4];
      widen64_fp8(col[c] + kQuantChunk * ch, left, T, w[0], w[1]);
      widen64_fp8(col[c] + kQuantChunk * ch + 64, left - 64, T, w[2], w[3]);
      const __m512 sv = _mm512_set1_ps(srow[c][b]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const uint16_t* a = A + m * R.ld + kQuantChunk * ch;
        __m512 blk = chunk_dot_bf16(a, w);
        acc[m][c] = _mm512_fmadd_ps(blk, sv, acc[m][c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) C[m * ldc + c] = _mm512_reduce_add_ps(acc[m][c]);
}

// Columns per tile of tile_fp8_vbmi: fewer than nc_bf16 from 3 rows, where its 4·NC widened
// vectors, MR·NC accumulators and the byte tables spilled (4 rows × 5 columns: 20 accumulators).
// One Zen 4 core, hot, K 2048 × N 768, rows on 64-byte lines, G vdpbf16ps/s against nc_bf16:
// 3 rows 2.85 → 2.98, 4 rows 3.16 → 3.51, 5 rows 3.38 → 3.66, 6 rows 3.52 → 3.89, 8 rows 4.11 →
// 4.03 (the same: 2 columns either way), 12 rows 3.49 → 3.92.
constexpr int nc_fp8(int MR) { return MR <= 2 ? 8 : MR <= 5 ? 3 : MR <= 8 ? 2 : 1; }

template <int MR>
MOE_AVX512_BF16_VBMI void rows_fp8_vbmi(const QuantMatrix& W, const QuantRows& R, int64_t i0,
                                        int64_t n0, int64_t n, float* C, int64_t ldc) {
  constexpr int NC = nc_fp8(MR);
  const Fp8ByteTables T = fp8_byte_tables();
  int64_t j = 0;
  for (; j + NC <= n; j += NC) tile_fp8_vbmi<MR, NC>(W, T, R, i0, n0 + j, C + j, ldc);
  for (; j < n; ++j) tile_fp8_vbmi<MR, 1>(W, T, R, i0, n0 + j, C + j, ldc);
}

template <int... MR>
void rows_fp8_vbmi_m(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t M, int64_t n0,
                     int64_t n, float* C, int64_t ldc, std::integer_sequence<int, MR...>) {
  ((M == MR + 1 ? rows_fp8_vbmi<MR + 1>(W, R, i0, n0, n, C, ldc) : void()), ...);
}

// ---- decode with int8 rows (4-bit codes) ---------------------------------------------------

// mxfp4's codes as unsigned bytes for vpdpbusd: 2·E2M1 + 12 (0 .. 24; the 1/2 rides on the
// row scales, the 12 comes off with the row sums), in every 128-bit lane.
MOE_AVX512 inline __m512i mxfp4_byte_table() {
  const float* v = f32_code_table(QuantFormatId::mxfp4);
  alignas(16) uint8_t t[16];
  for (int q = 0; q < 16; ++q) t[q] = static_cast<uint8_t>(2.0f * v[q] + 12.0f);
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// MR rows × NC columns: per chunk, two vpdpbusd sum a column's codes (low nibbles against the
// rows' even values, high against the odd ones) into exact int32 lane sums; converted, the
// zero point comes off as z · the rows' lane sums, and the weights' and the rows' scales
// multiply the result into the accumulators. With zero points (int4 z per block) the kernel
// takes z · Σ; with a fixed zero (int4 8, mxfp4 12: s8_rows_fixed_zero) the rows arrive with
// z · Σ · row scale made (quant_prepare_rows), one fmsub.
template <Codes Cd, int MR, int NC>
MOE_AVX512_VNNI void tile_vnni(const QuantMatrix& W, __m512i mx_table, const QuantRows& R,
                               int64_t i0, int64_t j0, float* C, int64_t ldc) {
  constexpr bool zp = Cd == Codes::int4_zp;
  constexpr int64_t scale_size = Cd == Codes::mxfp4 ? 1 : 2;
  const int64_t S = W.sub_blocks(), chunks = (S + 3) / 4;
  const __m512i spread = spread_index(W.block_k);
  const int64_t ahead = prefetch_columns(W, NC) * W.code_stride;
  const int8_t* A = static_cast<const int8_t*>(R.data) + i0 * R.ld;
  const float* rs = R.scales + i0 * chunks * 16;
  const float* sums = R.sums + i0 * chunks * 16;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const uint8_t* col[NC];
  const char* srow[NC];
  const uint8_t* zrow[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    const int64_t j = j0 + c;
    col[c] = W.codes + j * W.code_stride;
    srow[c] = static_cast<const char*>(W.scales) + j * W.scale_stride * scale_size;
    zrow[c] = zp ? W.zeros + j * W.zero_stride : nullptr;
  }
  __m512 acc[MR][NC];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  ChunkBlocks blocks(W.block_k);
  const bool one = blocks.per_chunk == 0;
  for (int64_t ch = 0; ch < chunks; ++ch, blocks.next()) {
    const int64_t nsub = std::min<int64_t>(4, S - 4 * ch);
    const unsigned mask = blocks.mask(nsub);
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      prefetch_in_order<NC>(col[0] + ahead, ch, c, 64);
      const uint8_t* p = col[c] + 64 * ch;
      const __m512i v = nsub >= 4 ? _mm512_loadu_si512(p)
                                  : _mm512_maskz_loadu_epi8(~0ull >> (64 - 16 * nsub), p);
      __m512i lo = _mm512_and_si512(v, nib);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      if constexpr (Cd == Codes::mxfp4) {
        lo = _mm512_shuffle_epi8(mx_table, lo);
        hi = _mm512_shuffle_epi8(mx_table, hi);
      }
      const __m512 sv = chunk_scale<Cd>(srow[c], blocks.b0, mask, one, spread);
      __m512 zv = _mm512_setzero_ps();
      if constexpr (zp) zv = chunk_zero(zrow[c], blocks.b0, mask, one, spread);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const int8_t* a = A + m * R.ld + kQuantChunk * ch;
        const int64_t at = (m * chunks + ch) * 16;
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(a + 64));
        if constexpr (zp) {
          const __m512 f =
              _mm512_fnmadd_ps(zv, _mm512_loadu_ps(sums + at), _mm512_cvtepi32_ps(d));
          acc[m][c] = _mm512_fmadd_ps(f, _mm512_mul_ps(sv, _mm512_loadu_ps(rs + at)), acc[m][c]);
        } else {  // sums = z · Σ · rs (quant_prepare_rows): (d − z·Σ)·rs in one fmsub
          const __m512 f = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(rs + at),
                                           _mm512_loadu_ps(sums + at));
          acc[m][c] = _mm512_fmadd_ps(f, sv, acc[m][c]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) C[m * ldc + c] = _mm512_reduce_add_ps(acc[m][c]);
}

template <Codes Cd, int MR>
MOE_AVX512_VNNI void rows_vnni(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t n0,
                               int64_t n, float* C, int64_t ldc) {
  constexpr int NC = nc_bf16(MR);
  const __m512i table = mxfp4_byte_table();
  int64_t j = 0;
  for (; j + NC <= n; j += NC) tile_vnni<Cd, MR, NC>(W, table, R, i0, n0 + j, C + j, ldc);
  for (; j < n; ++j) tile_vnni<Cd, MR, 1>(W, table, R, i0, n0 + j, C + j, ldc);
}

template <Codes Cd, int... MR>
void rows_vnni_m(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t M, int64_t n0,
                 int64_t n, float* C, int64_t ldc, std::integer_sequence<int, MR...>) {
  ((M == MR + 1 ? rows_vnni<Cd, MR + 1>(W, R, i0, n0, n, C, ldc) : void()), ...);
}

// ---- decode with int8 rows on a tiled matrix -------------------------------------------------

// 16 E8M0 exponents as fp32 2^(e − 127), one a 32-bit lane: 0 is 2^-127 (a subnormal), 255 NaN.
MOE_AVX512 inline __m512 e8m0_scales(__m128i e) {
  const __m512i s = _mm512_cvtepu8_epi32(e);
  __m512i bits = _mm512_slli_epi32(s, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_testn_epi32_mask(s, s), _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(s, _mm512_set1_epi32(255)),
                               _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(bits);
}

// The weights' scales of a tile's block b: one per column, as fp32 (fp16, or E8M0: 0 is 2^-127
// and 255 NaN).
template <Codes Cd>
MOE_AVX512_VNNI inline __m512 tile_scales(const QuantMatrix& W, int64_t tile, int64_t b) {
  const int64_t at = (tile * W.scale_stride + b) * kQuantTileCols;
  if constexpr (Cd == Codes::mxfp4) {
    return e8m0_scales(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(W.scales) + at)));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(W.scales) + at)));
  }
}

// The widened bytes of a tiled step, low (lo) and high (hi) nibbles, against MR rows' 4 even
// and 4 odd int8 values (at a and a + 64, rows ld apart) broadcast, into dl and dh.
template <int MR>
MOE_AVX512_VNNI __attribute__((always_inline)) inline void dot_rows(
    __m512i (&dl)[MR], __m512i (&dh)[MR], __m512i lo, __m512i hi, const int8_t* a, int64_t ld) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    int32_t even, odd;
    std::memcpy(&even, a + m * ld, 4);
    std::memcpy(&odd, a + m * ld + 64, 4);
    dl[m] = _mm512_dpbusd_epi32(dl[m], lo, _mm512_set1_epi32(even));
    dh[m] = _mm512_dpbusd_epi32(dh[m], hi, _mm512_set1_epi32(odd));
  }
}

// One step of tile16_vnni: 8 values of a tile's 16 columns (64 bytes at w) against MR rows'
// 4 even and 4 odd int8 values (at a and a + 64, rows ld apart), into dl and dh. int4's high
// nibbles stay in place (v & 0xf0, 16 times the code: one instruction fewer than a shift and a
// mask), the sums shifted back once per G; mxfp4's go through the table, which reads low nibbles.
template <Codes Cd, int MR>
MOE_AVX512_VNNI __attribute__((always_inline)) inline void tile16_step(
    __m512i (&dl)[MR], __m512i (&dh)[MR], const uint8_t* w, const int8_t* a, int64_t ld,
    __m512i nib, __m512i mx_table) {
  const __m512i v = _mm512_loadu_si512(w);
  __m512i lo = _mm512_and_si512(v, nib), hi;
  if constexpr (Cd == Codes::mxfp4) {
    lo = _mm512_shuffle_epi8(mx_table, lo);
    hi = _mm512_shuffle_epi8(mx_table, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
  } else {
    hi = _mm512_andnot_si512(nib, v);
  }
  dot_rows<MR>(dl, dh, lo, hi, a, ld);
}

// MR rows × one tile of 16 columns (tile t), into out (MR, 16). Per step of 8 values, one
// 64-byte load holds them for the tile's 16 columns (4 bytes each): its low nibbles (values 8s,
// 8s + 2, 8s + 4, 8s + 6) and its high ones (the odd values) are two vpdpbusd against the row's
// 4 even and 4 odd int8 values broadcast, into int32 lanes that are the columns; P sets of sums
// take alternate steps (independent chains where the rows are few). After each G = min(block_k,
// 128) values (the rows' scale block; the weights' scale is constant on it too) the sums become
// fp32: (d − z·Σ)·r, times the columns' scales, into the accumulators. One tile at a time: the
// bytes are one stream a thread (two tiles read side by side, as two streams, ran a Qwen3-shaped
// int4 decode step 25-35% slower cold than one; docs/quant.md, "Decode").
template <Codes Cd, int MR, int P>
MOE_AVX512_VNNI void tile16_vnni(const QuantMatrix& W, __m512i mx_table, const QuantRows& R,
                                 int64_t i0, int64_t t, float* out) {
  constexpr bool zp = Cd == Codes::int4_zp, mx = Cd == Codes::mxfp4;
  const int64_t steps = W.sub_blocks() * 4;
  // G divides block_k (32, 64 or a multiple of 128) and lies in one chunk of the rows: its
  // steps' even values sit 4 bytes apart (odd ones 64 further on), and it is 4, 8 or 16 steps.
  const int64_t G = std::min<int64_t>(W.block_k, kQuantChunk), gsteps = G / 8, blocks = R.ld / G;
  const int64_t per_block = W.block_k / G;
  const int8_t* A = static_cast<const int8_t*>(R.data) + i0 * R.ld;
  const float* rs = R.scales + i0 * blocks;
  const float* sums = R.sums + i0 * blocks;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const uint8_t* p = W.codes + t * W.code_stride;
  __m512 acc[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0, s0 = 0; s0 < steps; ++g, s0 += gsteps) {
    const int64_t n = std::min(steps - s0, gsteps);  // a multiple of 4
    const int8_t* a = A + (s0 >> 4) * kQuantChunk + 4 * (s0 & 15);
    __m512i dl[P][MR], dh[P][MR];
#pragma GCC unroll 2
    for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) dl[q][m] = dh[q][m] = _mm512_setzero_si512();
    for (int64_t s = 0; s < n; s += 4, p += 256, a += 16) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) prefetch(p + kPrefetchBytes + 64 * q);
      tile16_step<Cd, MR>(dl[0], dh[0], p, a, R.ld, nib, mx_table);
      tile16_step<Cd, MR>(dl[P - 1], dh[P - 1], p + 64, a + 4, R.ld, nib, mx_table);
      tile16_step<Cd, MR>(dl[0], dh[0], p + 128, a + 8, R.ld, nib, mx_table);
      tile16_step<Cd, MR>(dl[P - 1], dh[P - 1], p + 192, a + 12, R.ld, nib, mx_table);
    }
    const int64_t b = per_block == 1 ? g : g / per_block;  // the weights' block
    const __m512 sv = tile_scales<Cd>(W, t, b);
    __m512 zv = _mm512_setzero_ps();
    if constexpr (zp)
      zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(W.zeros + (t * W.zero_stride + b) * kQuantTileCols))));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      __m512i l = dl[0][m], h = dh[0][m];
      if constexpr (P > 1) l = _mm512_add_epi32(l, dl[1][m]), h = _mm512_add_epi32(h, dh[1][m]);
      if constexpr (!mx) h = _mm512_srai_epi32(h, 4);  // exact: 16 · the high codes' sums
      const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(l, h));
      const __m512 r = _mm512_set1_ps(rs[m * blocks + g]);
      if constexpr (zp) {
        const __m512 f = _mm512_fnmadd_ps(zv, _mm512_set1_ps(sums[m * blocks + g]), d);
        acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(sv, r), acc[m]);
      } else {  // sums = z · Σ · r (quant_prepare_rows)
        const __m512 f = _mm512_fmsub_ps(d, r, _mm512_set1_ps(sums[m * blocks + g]));
        acc[m] = _mm512_fmadd_ps(f, sv, acc[m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kQuantTileCols, acc[m]);
}

// ---- mxfp4 with shared exponents (QuantRows::shared_exponents) --------------------------------

// Entry 16·d + q: 2·E2M1(q)·2^d + 128 as a byte (d = 0..3; at most 2·6·8 = 96 from 128).
MOE_AVX512 inline __m512i mxfp4_shifted_table() {
  static const std::array<uint8_t, 64> t = [] {
    const float* v = f32_code_table(QuantFormatId::mxfp4);
    std::array<uint8_t, 64> a{};
    for (int d = 0; d < 4; ++d)
      for (int q = 0; q < 16; ++q)
        a[static_cast<size_t>(16 * d + q)] = static_cast<uint8_t>(128 + static_cast<int>(2.0f * v[q]) * (1 << d));
    return a;
  }();
  return _mm512_loadu_si512(t.data());
}

// One step of tile16_mx_shared (tile16_step's shape): each nibble, with its column's 16·d in
// `shift`, indexes the shifted table (one vpternlogd and one vpermb a nibble). Sum: also the
// rows' own sums (vpdpbusd against bytes of 1), where the block's correction is not made.
template <int MR, bool Sum>
MOE_AVX512_VNNI_VBMI __attribute__((always_inline)) inline void mx_shared_step(
    __m512i (&dl)[MR], __m512i (&dh)[MR], __m512i (&ds)[MR], const uint8_t* w, const int8_t* a,
    int64_t ld, __m512i nib, __m512i shift, __m512i table) {
  // A line a step, 8 KiB on (the compiler gathered a loop's prefetches of a chunk in one place).
  _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T1);
  const __m512i v = _mm512_loadu_si512(w);
  constexpr int kAndOr = 0xea;  // (v & nib) | shift
  const __m512i lo = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(v, nib, shift, kAndOr), table);
  const __m512i hi = _mm512_permutexvar_epi8(
      _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, shift, kAndOr), table);
  dot_rows<MR>(dl, dh, lo, hi, a, ld);
  if constexpr (Sum) {
    const __m512i one = _mm512_set1_epi8(1);
    dot_rows<MR>(ds, ds, one, one, a, ld);  // Σ of the 4 even and the 4 odd values
  }
}

// tile16_vnni for mxfp4 with rows per 128 values: per chunk of 128 (four blocks of 32) and
// column, where the four E8M0 exponents e_L lie within 3 of their least e, the codes widen to
// 2·E2M1·2^(e_L − e) + 128 (exact bytes), so the chunk is one exact int32 sum a row and one
// fp32 step (the rows' sums hold 128 · Σ · row scale), against four per-32 steps before. A
// chunk where some column's exponents spread more (or one is 255, NaN), a last chunk of fewer
// than four blocks, and every chunk under kSharedFromRows rows, takes a step per block (table
// entries 2·E2M1 + 128), its rows' sums over the block made by two more vpdpbusd against
// bytes of 1. Shared exponents from 4 rows: one Zen 4 core, hot, K 2048 × N 768, 4 rows 30 →
// 21 µs, 8 rows 54 → 38 (the per-32 kernel, tile16_vnni, before); cold, K 4096 × N 14336, 2
// threads, alternating in one process, they read 1 to 3 rows 0-20% slower than the per-block
// steps, which read as fast as the per-32 kernel there (docs/quant.md, "Decode").
constexpr int kSharedFromRows = 4;
template <int MR, int P>
MOE_AVX512_VNNI_VBMI void tile16_mx_shared(const QuantMatrix& W, const QuantRows& R, int64_t i0,
                                           int64_t t, float* out) {
  const int64_t S = W.sub_blocks(), blocks = R.ld / kQuantChunk;
  const int8_t* A = static_cast<const int8_t*>(R.data) + i0 * R.ld;
  const float* rs = R.scales + i0 * blocks;
  const float* sums = R.sums + i0 * blocks;
  const __m512i nib = _mm512_set1_epi8(0x0f), table = mxfp4_shifted_table();
  const uint8_t* p = W.codes + t * W.code_stride;
  const uint8_t* ex = static_cast<const uint8_t*>(W.scales) + t * W.scale_stride * kQuantTileCols;
  // vpermb indices: lane L of a 64-byte vector of exponents → each column's byte in its 4 code
  // bytes.
  static const std::array<std::array<uint8_t, 64>, 4> kSpread = [] {
    std::array<std::array<uint8_t, 64>, 4> b{};
    for (int L = 0; L < 4; ++L)
      for (int i = 0; i < 64; ++i) b[L][i] = static_cast<uint8_t>(16 * L + i / 4);
    return b;
  }();
  __m512 acc[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  __m512i dl[P][MR], dh[P][MR], ds[MR], tot[MR];
  for (int64_t g = 0; 4 * g < S; ++g) {
    const int64_t nsub = std::min<int64_t>(4, S - 4 * g);
    const int8_t* a = A + g * kQuantChunk;
    // The exponents 8 chunks on (the codes' 8 KiB): the chunk's widening waits on its own.
    prefetch(ex + (4 * g + 32) * kQuantTileCols);
    bool shared = false;
    __m512i emin, d;
    if (nsub == 4) {
      const __m512i e = _mm512_loadu_si512(ex + 4 * g * kQuantTileCols);
      const __m512i m1 = _mm512_min_epu8(e, _mm512_shuffle_i32x4(e, e, 0xb1));
      emin = _mm512_min_epu8(m1, _mm512_shuffle_i32x4(m1, m1, 0x4e));
      d = _mm512_sub_epi8(e, emin);
      shared = (_mm512_cmpgt_epu8_mask(d, _mm512_set1_epi8(3)) |
                _mm512_cmpeq_epi8_mask(e, _mm512_set1_epi8(-1))) == 0;
    }
    if (shared && MR >= kSharedFromRows) {
      const __m512i d16 = _mm512_slli_epi16(d, 4);  // 16·d a byte (d ≤ 3: nothing crosses)
#pragma GCC unroll 2
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) dl[q][m] = dh[q][m] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int L = 0; L < 4; ++L, p += 256, a += 16) {
        const __m512i shift = _mm512_permutexvar_epi8(_mm512_loadu_si512(kSpread[L].data()), d16);
        mx_shared_step<MR, false>(dl[0], dh[0], ds, p, a, R.ld, nib, shift, table);
        mx_shared_step<MR, false>(dl[P - 1], dh[P - 1], ds, p + 64, a + 4, R.ld, nib, shift, table);
        mx_shared_step<MR, false>(dl[0], dh[0], ds, p + 128, a + 8, R.ld, nib, shift, table);
        mx_shared_step<MR, false>(dl[P - 1], dh[P - 1], ds, p + 192, a + 12, R.ld, nib, shift, table);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        __m512i l = dl[0][m], h = dh[0][m];
        if constexpr (P > 1) l = _mm512_add_epi32(l, dl[1][m]), h = _mm512_add_epi32(h, dh[1][m]);
        tot[m] = _mm512_add_epi32(l, h);
      }
    } else {  // a step per block of 32 (table entries 2·E2M1 + 128)
      __m512i sum[MR];  // shared: Σ over the blocks of Σ 2·E2M1·x · 2^d_L, and of Σ x
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) tot[m] = sum[m] = _mm512_setzero_si512();
      for (int64_t L = 0; L < nsub; ++L, p += 256, a += 16) {
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) dl[0][m] = dh[0][m] = ds[m] = _mm512_setzero_si512();
        const __m512i shift = _mm512_setzero_si512();
        for (int s = 0; s < 4; ++s)
          mx_shared_step<MR, true>(dl[0], dh[0], ds, p + 64 * s, a + 4 * s, R.ld, nib, shift, table);
        // shared: d_L of each column as a 32-bit shift; else the block's scales.
        __m512i dL = _mm512_setzero_si512();
        __m512 sv = _mm512_setzero_ps();
        if (shared)
          dL = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(_mm512_permutexvar_epi32(
              _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(4 * L)),
                               _mm512_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
              d)));
        else
          sv = tile_scales<Codes::mxfp4>(W, t, 4 * g + L);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {  // Σ 2·E2M1·x = Σ (2·E2M1 + 128)·x − 128 · Σ x, exact
          const __m512i v = _mm512_sub_epi32(_mm512_add_epi32(dl[0][m], dh[0][m]),
                                             _mm512_slli_epi32(ds[m], 7));
          if (shared) {
            tot[m] = _mm512_add_epi32(tot[m], _mm512_sllv_epi32(v, dL));
            sum[m] = _mm512_add_epi32(sum[m], ds[m]);
          } else {
            acc[m] = _mm512_fmadd_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(rs[m * blocks + g])), sv, acc[m]);
          }
        }
      }
      p += 256 * (4 - nsub);  // (nsub < 4 only in the last chunk)
      if (!shared) continue;
      // The shared sum's integer, bit for bit: with the offsets, Σ (2·E2M1·2^d_L + 128)·x.
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) tot[m] = _mm512_add_epi32(tot[m], _mm512_slli_epi32(sum[m], 7));
    }
    // One fp32 step a chunk (the rows' sums hold 128 · Σ · row scale): the same bits whichever
    // way the integer was made, so a row's result does not depend on the rows beside it.
    const __m512 sv = e8m0_scales(_mm512_castsi512_si128(emin));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 f = _mm512_fmsub_ps(_mm512_cvtepi32_ps(tot[m]), _mm512_set1_ps(rs[m * blocks + g]),
                                       _mm512_set1_ps(sums[m * blocks + g]));
      acc[m] = _mm512_fmadd_ps(f, sv, acc[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kQuantTileCols, acc[m]);
}

// Columns [n0, n0 + n) of MR rows: the tiles that hold them in order; C gets the requested
// columns only. The first 8 KiB are asked for up front (the steps then fetch 8 KiB ahead).
template <Codes Cd, int MR>
MOE_AVX512_VNNI void rows_vnni_tiled(const QuantMatrix& W, const QuantRows& R, int64_t i0,
                                     int64_t n0, int64_t n, float* C, int64_t ldc) {
  constexpr int P = MR <= 4 ? 2 : 1;
  const __m512i table = mxfp4_byte_table();
  const int64_t first = n0 / kQuantTileCols, last = (n0 + n + kQuantTileCols - 1) / kQuantTileCols;
  for (int64_t b = 0; b < kPrefetchBytes; b += 64) prefetch(W.codes + first * W.code_stride + b);
  alignas(64) float out[MR * kQuantTileCols];
  for (int64_t t = first; t < last; ++t) {
    if (Cd == Codes::mxfp4 && R.shared_exponents)
      tile16_mx_shared<MR, P>(W, R, i0, t, out);
    else
      tile16_vnni<Cd, MR, P>(W, table, R, i0, t, out);
    const int64_t j0 = std::max(n0, t * kQuantTileCols);
    const int64_t j1 = std::min(n0 + n, (t + 1) * kQuantTileCols);
    for (int m = 0; m < MR; ++m)
      for (int64_t j = j0; j < j1; ++j)
        C[m * ldc + (j - n0)] = out[m * kQuantTileCols + (j - t * kQuantTileCols)];
  }
}

template <Codes Cd, int... MR>
void rows_vnni_tiled_m(const QuantMatrix& W, const QuantRows& R, int64_t i0, int64_t M, int64_t n0,
                       int64_t n, float* C, int64_t ldc, std::integer_sequence<int, MR...>) {
  ((M == MR + 1 ? rows_vnni_tiled<Cd, MR + 1>(W, R, i0, n0, n, C, ldc) : void()), ...);
}

// ---- decode with fp32 rows -----------------------------------------------------------------

// The weights widened to fp32 with the block's scale folded in (exact for int4 and mxfp4, one
// fp32 rounding for fp8), then one vfmadd per row and 16 values.
template <Codes Cd, int MR, int NC>
MOE_AVX512 void tile_f32(const QuantMatrix& W, const Tables& T, const float* A, int64_t lda,
                         int64_t j0, float* C, int64_t ldc) {
  const int64_t S = W.sub_blocks(), spb = W.block_k / 32;
  constexpr int64_t step = Cd == Codes::fp8 ? 32 : 16;  // code bytes per sub-block
  const int64_t ahead = prefetch_columns(W, NC) * W.code_stride;
  const uint8_t* col[NC];
  #pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) col[c] = W.codes + (j0 + c) * W.code_stride;
  __m512 acc[MR][NC];
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t s0 = 0, b = 0; s0 < S; s0 += spb, ++b) {
    const int64_t s1 = std::min(S, s0 + spb);
    __m512i off[NC];
    __m512 sv[NC];
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      const BlockParams p = block_params<Cd>(W, j0 + c, b);
      sv[c] = _mm512_set1_ps(p.scale);
      off[c] = _mm512_set1_epi16(static_cast<short>(p.offset));
    }
    for (int64_t s = s0; s < s1; ++s) {
      __m512 w0[NC], w1[NC];
      if ((s * step) % 64 == 0)
        #pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) prefetch(col[c] + ahead + s * step);
      #pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        const __m512i w = widen_bf16<Cd>(col[c], s, W.K, T, off[c]);
        w0[c] = _mm512_mul_ps(bf16_lo_f32(w), sv[c]);
        w1[c] = _mm512_mul_ps(bf16_hi_f32(w), sv[c]);
      }
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 a0 = _mm512_loadu_ps(A + m * lda + 32 * s);
        const __m512 a1 = _mm512_loadu_ps(A + m * lda + 32 * s + 16);
        #pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) {
          acc[m][c] = _mm512_fmadd_ps(a0, w0[c], acc[m][c]);
          acc[m][c] = _mm512_fmadd_ps(a1, w1[c], acc[m][c]);
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) C[m * ldc + c] = _mm512_reduce_add_ps(acc[m][c]);
}

constexpr int nc_f32(int MR) { return MR == 1 ? 8 : MR == 2 ? 4 : MR <= 4 ? 4 : 2; }

template <Codes Cd, int MR>
MOE_AVX512 void rows_f32(const QuantMatrix& W, const float* A, int64_t lda, int64_t n0, int64_t n,
                         float* C, int64_t ldc) {
  constexpr int NC = nc_f32(MR);
  const Tables T = load_tables(W.format);
  int64_t j = 0;
  for (; j + NC <= n; j += NC) tile_f32<Cd, MR, NC>(W, T, A, lda, n0 + j, C + j, ldc);
  for (; j < n; ++j) tile_f32<Cd, MR, 1>(W, T, A, lda, n0 + j, C + j, ldc);
}

template <Codes Cd>
void rows_f32_m(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                int64_t n, float* C, int64_t ldc) {
  switch (M) {
    case 1: return rows_f32<Cd, 1>(W, A, lda, n0, n, C, ldc);
    case 2: return rows_f32<Cd, 2>(W, A, lda, n0, n, C, ldc);
    case 3: return rows_f32<Cd, 3>(W, A, lda, n0, n, C, ldc);
    case 4: return rows_f32<Cd, 4>(W, A, lda, n0, n, C, ldc);
    case 5: return rows_f32<Cd, 5>(W, A, lda, n0, n, C, ldc);
    case 6: return rows_f32<Cd, 6>(W, A, lda, n0, n, C, ldc);
    case 7: return rows_f32<Cd, 7>(W, A, lda, n0, n, C, ldc);
    default: return rows_f32<Cd, 8>(W, A, lda, n0, n, C, ldc);
  }
}

// ---- the panel widening of prefill ---------------------------------------------------------

// fp32 → bf16, nearest even, NaN quieted: bf16.hpp's to_bf16 on 16 lanes (the same bits).
MOE_AVX512 inline __m256i to_bf16_16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}


// fp8: the table of one (128 columns, 128 values of K) block's 128 magnitudes times its
// scale, bf16(value(m) · scale) — the products rounded once per block instead of once per
// value, the same numbers; widen_bf16 XORs the code's sign bit onto the word (bf16(−x) =
// −bf16(x), NaN codes included, whatever the scale's sign).
MOE_AVX512 inline Tables scaled_fp8_table(float scale) {
  const float* v = f32_code_table(QuantFormatId::fp8);
  const __m512 sv = _mm512_set1_ps(scale);
  Tables T;
  for (int i = 0; i < 4; ++i) {
    const __m256i lo = to_bf16_16(_mm512_mul_ps(_mm512_loadu_ps(v + 32 * i), sv));
    const __m256i hi = to_bf16_16(_mm512_mul_ps(_mm512_loadu_ps(v + 32 * i + 16), sv));
    T.t[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  return T;
}

// 16 columns (c0 ..) of the panel, sub-blocks [0, ns) of the chunk: each column's 32 values
// widened, scaled, rounded and masked past kc, then transposed into 16 pair rows.
template <Codes Cd>
MOE_AVX512 void widen_columns(const QuantMatrix& W, const Tables& T, int64_t j0, int64_t c0,
                              int64_t ncols, int64_t k0, int64_t kc, uint16_t* panel) {
  const int64_t ns = (kc + 31) / 32, pairs = (kc + 1) / 2;
  Tables scaled{};
  int64_t scaled_for = -1;  // fp8: the (column block, K block) the scaled table is of
  for (int64_t sub = 0; sub < ns; ++sub) {
    const int64_t s = k0 / 32 + sub, b = 32 * s / W.block_k;
    const int64_t left = kc - 32 * sub;
    const __mmask32 keep = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1u);
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i) {
      if (c0 + i >= ncols) {
        r[i] = _mm512_setzero_si512();
        continue;
      }
      const int64_t j = j0 + c0 + i;
      if constexpr (Cd == Codes::fp8) {
        // Into L1 two lines ahead: sixteen columns at a stride of K bytes are more streams
        // than the hardware prefetchers follow, and each line here came to L2 only.
        if (sub % 2 == 0) prefetch_l1(W.codes + j * W.code_stride + 32 * (s + 4));
        const int64_t key = (j / 128) * W.scale_stride + b;
        if (key != scaled_for) {
          scaled = scaled_fp8_table(block_params<Cd>(W, j, b).scale);
          scaled_for = key;
        }
        r[i] = _mm512_maskz_mov_epi16(
            keep, widen_bf16<Cd>(W.codes + j * W.code_stride, s, W.K, scaled, _mm512_setzero_si512()));
        continue;
      }
      const BlockParams p = block_params<Cd>(W, j, b);
      const __m512i w = widen_bf16<Cd>(W.codes + j * W.code_stride, s, W.K, T,
                                      _mm512_set1_epi16(static_cast<short>(p.offset)));
      const __m512 sv = _mm512_set1_ps(p.scale);
      const __m256i lo = to_bf16_16(_mm512_mul_ps(bf16_lo_f32(w), sv));
      const __m256i hi = to_bf16_16(_mm512_mul_ps(bf16_hi_f32(w), sv));
      r[i] = _mm512_maskz_mov_epi16(keep, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    }
    transpose_16x16(r);
    for (int64_t i = 0; i < 16 && 16 * sub + i < pairs; ++i)
      _mm512_storeu_si512(panel + packed_bf16_index(kc, 2 * (16 * sub + i), c0), r[i]);
  }
}

// 4-bit codes: per column and chunk, lane L of two vpshufb byte tables holds the low and high
// bytes of bf16(value(q) · scale) for the block sub-block L falls in — 16 products rounded
// once per block instead of one per value, the same numbers — so a chunk widens straight into
// its 64 (even, odd) pairs: four vpshufb, four vpunpck*bw, four vpunpck*wd.
struct ByteTable {
  __m128i lo, hi;
};
template <Codes Cd>
MOE_AVX512 inline ByteTable scaled_table(const QuantMatrix& W, int64_t j, int64_t b) {
  const float* values = f32_code_table(W.format);
  float s, z = 0.0f;
  if constexpr (Cd == Codes::mxfp4) {
    s = e8m0_table()[static_cast<const uint8_t*>(W.scales)[j * W.scale_stride + b]];
  } else {
    s = _cvtsh_ss(static_cast<const uint16_t*>(W.scales)[j * W.scale_stride + b]);
    z = Cd == Codes::int4_zp ? static_cast<float>(W.zeros[j * W.zero_stride + b]) : 8.0f;
  }
  const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(values), _mm512_set1_ps(z)),
                                 _mm512_set1_ps(s));
  const __m256i w = to_bf16_16(v);
  return {_mm256_cvtepi16_epi8(w), _mm256_cvtepi16_epi8(_mm256_srli_epi16(w, 8))};
}

template <Codes Cd>
MOE_AVX512 void widen_columns4(const QuantMatrix& W, int64_t j0, int64_t c0, int64_t ncols,
                               int64_t k0, int64_t kc, uint16_t* panel) {
  const int64_t S = W.sub_blocks(), bk = W.block_k, pairs = (kc + 1) / 2;
  const int64_t chunks = (kc + kQuantChunk - 1) / kQuantChunk;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  alignas(64) __m512i D[4][16];
  for (int64_t cl = 0; cl < chunks; ++cl) {
    const int64_t ch = k0 / kQuantChunk + cl, nsub = std::min<int64_t>(4, S - 4 * ch);
    for (int64_t i = 0; i < 16; ++i) {
      if (c0 + i >= ncols) {
        for (int d = 0; d < 4; ++d) D[d][i] = _mm512_setzero_si512();
        continue;
      }
      const int64_t j = j0 + c0 + i;
      // The tables of the chunk's blocks: one for blocks of 128 or more, else one per lane.
      __m512i tlo, thi;
      if (bk >= kQuantChunk) {
        const ByteTable t = scaled_table<Cd>(W, j, kQuantChunk * ch / bk);
        tlo = _mm512_broadcast_i32x4(t.lo);
        thi = _mm512_broadcast_i32x4(t.hi);
      } else {
        __m128i lo[4], hi[4];
        for (int L = 0; L < 4; ++L) {
          const int64_t b = (kQuantChunk * ch + 32 * L) / bk;
          if (L > 0 && b == (kQuantChunk * ch + 32 * (L - 1)) / bk) {
            lo[L] = lo[L - 1];
            hi[L] = hi[L - 1];
          } else if (L < nsub) {
            const ByteTable t = scaled_table<Cd>(W, j, b);
            lo[L] = t.lo;
            hi[L] = t.hi;
          } else {
            lo[L] = hi[L] = _mm_setzero_si128();
          }
        }
        tlo = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(lo[0]), lo[1], 1), lo[2], 2), lo[3], 3);
        thi = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(hi[0]), hi[1], 1), hi[2], 2), hi[3], 3);
      }
      const uint8_t* p = W.codes + j * W.code_stride + 64 * ch;
      const __m512i v = nsub >= 4 ? _mm512_loadu_si512(p)
                                  : _mm512_maskz_loadu_epi8(~0ull >> (64 - 16 * nsub), p);
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const __m512i llo = _mm512_shuffle_epi8(tlo, lo), lhi = _mm512_shuffle_epi8(thi, lo);
      const __m512i hlo = _mm512_shuffle_epi8(tlo, hi), hhi = _mm512_shuffle_epi8(thi, hi);
      // Words of the even and of the odd values, bytes 16L .. 16L + 7 and 16L + 8 .. 15 ...
      const __m512i we = _mm512_unpacklo_epi8(llo, lhi), wo = _mm512_unpacklo_epi8(hlo, hhi);
      const __m512i xe = _mm512_unpackhi_epi8(llo, lhi), xo = _mm512_unpackhi_epi8(hlo, hhi);
      // ... paired: D[d] lane L, dword t is the pair of code byte 16L + 4d + t.
      D[0][i] = _mm512_unpacklo_epi16(we, wo);
      D[1][i] = _mm512_unpackhi_epi16(we, wo);
      D[2][i] = _mm512_unpacklo_epi16(xe, xo);
      D[3][i] = _mm512_unpackhi_epi16(xe, xo);
    }
    for (int d = 0; d < 4; ++d) {
      transpose_16x16(D[d]);
      for (int r = 0; r < 16; ++r) {
        const int64_t pair = kQuantChunk / 2 * cl + 16 * (r / 4) + 4 * d + r % 4;
        if (pair < pairs) _mm512_storeu_si512(panel + packed_bf16_index(kc, 2 * pair, c0), D[d][r]);
      }
    }
  }
  if (kc % 2)  // the last pair's second value is padding
    for (int64_t i = 0; i < 16; ++i) panel[packed_bf16_index(kc, kc, c0 + i)] = 0;
}

template <Codes Cd>
MOE_AVX512 void widen_panel(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                            uint16_t* panel) {
  const Tables T = load_tables(W.format);
  for (int64_t c0 = 0; c0 < kPanelCols; c0 += 16) {
    if (Cd == Codes::fp8 || k0 % kQuantChunk != 0)  // (prefill's panels start on chunks)
      widen_columns<Cd>(W, T, j0, c0, nc, k0, kc, panel);
    else
      widen_columns4<Cd>(W, j0, c0, nc, k0, kc, panel);
  }
}

}  // namespace

void decode_avx512_bf16(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                        int64_t n0, int64_t n, float* C, int64_t ldc) {
  MOE_ASSERT(M >= 1 && M <= 16);
  constexpr auto mr = std::make_integer_sequence<int, 16>{};
  switch (codes_of(W)) {
    case Codes::int4_sym: return rows_bf16_m<Codes::int4_sym>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::int4_zp: return rows_bf16_m<Codes::int4_zp>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::mxfp4: return rows_bf16_m<Codes::mxfp4>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::fp8:
      if (rows.interleaved) return rows_fp8_vbmi_m(W, rows, i0, M, n0, n, C, ldc, mr);
      return rows_bf16_m<Codes::fp8>(W, rows, i0, M, n0, n, C, ldc, mr);
  }
}

void decode_avx512_vnni(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                        int64_t n0, int64_t n, float* C, int64_t ldc) {
  MOE_ASSERT(M >= 1 && M <= 16);
  constexpr auto mr = std::make_integer_sequence<int, 16>{};
  switch (codes_of(W)) {
    case Codes::int4_sym: return rows_vnni_m<Codes::int4_sym>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::int4_zp: return rows_vnni_m<Codes::int4_zp>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::mxfp4: return rows_vnni_m<Codes::mxfp4>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::fp8: MOE_ASSERT(!"avx512_vnni reads 4-bit codes only"); return;
  }
}

MOE_AVX512 void untile_codes_avx512(const QuantMatrix& W, int64_t t0, int64_t tiles, uint8_t* dst) {
  const int64_t steps = W.sub_blocks() * 4, col = 4 * steps;
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* tile = W.codes + (t0 + t) * W.code_stride;
    uint8_t* out = dst + t * kQuantTileCols * col;
    for (int64_t s0 = 0; s0 < steps; s0 += 16) {
      const int64_t ns = std::min<int64_t>(16, steps - s0);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < ns ? _mm512_loadu_si512(tile + 64 * (s0 + i)) : _mm512_setzero_si512();
      transpose_16x16(r);  // r[c]: column c's dwords of steps s0 .. s0 + 15
      const __mmask16 keep = static_cast<__mmask16>((1u << ns) - 1u);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) _mm512_mask_storeu_epi32(out + c * col + 4 * s0, keep, r[c]);
    }
  }
}

void decode_avx512_vnni_tiled(const QuantMatrix& W, const QuantRows& rows, int64_t i0, int64_t M,
                              int64_t n0, int64_t n, float* C, int64_t ldc) {
  MOE_ASSERT(M >= 1 && M <= 8 && W.tiled && rows.tiled);
  constexpr auto mr = std::make_integer_sequence<int, 8>{};
  switch (codes_of(W)) {
    case Codes::int4_sym: return rows_vnni_tiled_m<Codes::int4_sym>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::int4_zp: return rows_vnni_tiled_m<Codes::int4_zp>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::mxfp4: return rows_vnni_tiled_m<Codes::mxfp4>(W, rows, i0, M, n0, n, C, ldc, mr);
    case Codes::fp8: MOE_ASSERT(!"a tiled matrix has 4-bit codes"); return;
  }
}

void decode_avx512(const QuantMatrix& W, const float* A, int64_t lda, int64_t M, int64_t n0,
                   int64_t n, float* C, int64_t ldc) {
  MOE_ASSERT(M >= 1 && M <= 8);
  switch (codes_of(W)) {
    case Codes::int4_sym: return rows_f32_m<Codes::int4_sym>(W, A, lda, M, n0, n, C, ldc);
    case Codes::int4_zp: return rows_f32_m<Codes::int4_zp>(W, A, lda, M, n0, n, C, ldc);
    case Codes::mxfp4: return rows_f32_m<Codes::mxfp4>(W, A, lda, M, n0, n, C, ldc);
    case Codes::fp8: return rows_f32_m<Codes::fp8>(W, A, lda, M, n0, n, C, ldc);
  }
}

void widen_panel_avx512(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                        uint16_t* panel) {
  switch (codes_of(W)) {
    case Codes::int4_sym: return widen_panel<Codes::int4_sym>(W, j0, nc, k0, kc, panel);
    case Codes::int4_zp: return widen_panel<Codes::int4_zp>(W, j0, nc, k0, kc, panel);
    case Codes::mxfp4: return widen_panel<Codes::mxfp4>(W, j0, nc, k0, kc, panel);
    case Codes::fp8: return widen_panel<Codes::fp8>(W, j0, nc, k0, kc, panel);
  }
}

}  // namespace moe::detail::quant_impl
