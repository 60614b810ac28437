#include "common/philox.hpp"

#include <algorithm>

#include "common/vec_math.hpp"

#include <immintrin.h>

#include "common/cpu.hpp"
// GCC 12's AVX-512 shift intrinsics pass an undefined merge source, which its
// -W(maybe-)uninitialized reports inside its own header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moe::detail {

namespace {

// AVX-512 code from here to the pop below (GCC's target pragma; clang's attribute pragma
// does the same, as clang ignores GCC's).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#endif
// 32×32 → 64-bit products of 16 lanes by a constant, as their low and high halves. The
// compilers write uint64_t{m} * v over 16 lanes as vpmullq (a full 64-bit multiply, three
// micro-ops); vpmuludq takes the low 32 bits of each 64-bit lane, so the even lanes and the
// odd ones (shifted down) are two single multiplies.
inline void mul_hi_lo(__m512i& hi, __m512i& lo, __m512i v, __m512i m) {
  const __m512i even = _mm512_mul_epu32(v, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(v, 32), m);
  constexpr __mmask16 kOdd = 0xAAAA;
  lo = _mm512_mask_blend_epi32(kOdd, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(even, 32), odd);
}

// The ten rounds on 16 lanes at once (the integers are exact: the same words as the portable
// loop below, on any level).
void philox_rounds_avx512(uint32_t* v0, uint32_t* v1, uint32_t* v2, uint32_t* v3,
                          const uint32_t ctr[4][kPhiloxLanes], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  static_assert(kPhiloxLanes == 16);
  __m512i a0 = _mm512_loadu_si512(ctr[0]), a1 = _mm512_loadu_si512(ctr[1]);
  __m512i a2 = _mm512_loadu_si512(ctr[2]), a3 = _mm512_loadu_si512(ctr[3]);
  // vpmuludq reads the low 32 bits of each 64-bit lane: the constants sit there.
  const __m512i m0 = _mm512_set1_epi64(kM0), m1 = _mm512_set1_epi64(kM1);
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mul_hi_lo(hi0, lo0, a0, m0);
    mul_hi_lo(hi1, lo1, a2, m1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, a1),
                                        _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, a3),
                                        _mm512_set1_epi32(static_cast<int>(k1)));
    a1 = lo1;
    a3 = lo0;
    a0 = n0;
    a2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  _mm512_store_si512(v0, a0);
  _mm512_store_si512(v1, a1);
  _mm512_store_si512(v2, a2);
  _mm512_store_si512(v3, a3);
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace

// Not inline on purpose: one compiled instance of the lane arithmetic serves every caller.
void philox_normal_lanes(float z[4][kPhiloxLanes], const uint32_t ctr[4][kPhiloxLanes],
                         uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  alignas(64) uint32_t v0[kPhiloxLanes], v1[kPhiloxLanes], v2[kPhiloxLanes], v3[kPhiloxLanes];
  if (isa_at_least(Isa::avx512)) {
    philox_rounds_avx512(v0, v1, v2, v3, ctr, k0, k1);
  } else {
    std::copy(ctr[0], ctr[0] + kPhiloxLanes, v0);
    std::copy(ctr[1], ctr[1] + kPhiloxLanes, v1);
    std::copy(ctr[2], ctr[2] + kPhiloxLanes, v2);
    std::copy(ctr[3], ctr[3] + kPhiloxLanes, v3);
    for (int r = 0; r < 10; ++r) {
#pragma omp simd
      for (int l = 0; l < kPhiloxLanes; ++l) {
        const uint64_t p0 = uint64_t{kM0} * v0[l];
        const uint64_t p1 = uint64_t{kM1} * v2[l];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ v1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ v3[l] ^ k1;
        v1[l] = static_cast<uint32_t>(p1);
        v3[l] = static_cast<uint32_t>(p0);
        v0[l] = n0;
        v2[l] = n2;
      }
      k0 += kW0;
      k1 += kW1;
    }
  }
#pragma omp simd
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const float ra = sqrt_f32(-2.0f * log_f32(philox_u1(v0[l])));
    const float rb = sqrt_f32(-2.0f * log_f32(philox_u1(v2[l])));
    float sa, ca, sb, cb;
    sincos2pi_f32(philox_u2(v1[l]), sa, ca);
    sincos2pi_f32(philox_u2(v3[l]), sb, cb);
    z[0][l] = ra * ca;
    z[1][l] = ra * sa;
    z[2][l] = rb * cb;
    z[3][l] = rb * sb;
  }
}

void philox_normal_rows(float* eps, int64_t ld, int64_t n_tok, int64_t E, uint64_t seed,
                        uint64_t step, int64_t token0) {
  const int64_t nb = (E + 3) / 4;  // Philox blocks per token
  const int64_t total = n_tok * nb;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) uint32_t ctr[4][kPhiloxLanes];
  alignas(64) float z[4][kPhiloxLanes];
  // (token, block) pairs are laid out token-major and cut into groups of 16 lanes, so small
  // E does not waste lanes: E = 8 packs 8 tokens into one call.
  int64_t tok = 0, blk = 0;
  for (int64_t p0 = 0; p0 < total; p0 += kPhiloxLanes) {
    if (blk + kPhiloxLanes <= nb && 4 * (blk + kPhiloxLanes) <= E) {
      // All 16 lanes in one token and every word used: counters and the scatter are plain
      // strided loops (the common case for E ≥ 64).
      const Philox4 c = philox_counter(step, token0 + tok, blk);
      for (int l = 0; l < kPhiloxLanes; ++l) {
        ctr[0][l] = c.v[0] + static_cast<uint32_t>(l);
        ctr[1][l] = c.v[1];
        ctr[2][l] = c.v[2];
        ctr[3][l] = c.v[3];
      }
      philox_normal_lanes(z, ctr, k0, k1);
      float* row = eps + tok * ld + 4 * blk;
      for (int l = 0; l < kPhiloxLanes; ++l)
        for (int j = 0; j < 4; ++j) row[4 * l + j] = z[j][l];
      blk += kPhiloxLanes;
      if (blk == nb) blk = 0, ++tok;
      continue;
    }
    const int n = static_cast<int>(std::min<int64_t>(kPhiloxLanes, total - p0));
    int64_t t = tok, b = blk;
    for (int l = 0; l < kPhiloxLanes; ++l) {
      // Unused lanes repeat the last real counter; their results are discarded.
      const Philox4 c = philox_counter(step, token0 + t, b);
      for (int j = 0; j < 4; ++j) ctr[j][l] = c.v[j];
      if (l + 1 < n && ++b == nb) b = 0, ++t;
    }
    philox_normal_lanes(z, ctr, k0, k1);
    for (int l = 0; l < n; ++l) {
      float* row = eps + tok * ld;
      for (int j = 0; j < 4 && 4 * blk + j < E; ++j) row[4 * blk + j] = z[j][l];
      if (++blk == nb) blk = 0, ++tok;
    }
  }
}

void philox_normal4(float out[4], uint64_t seed, uint64_t step, int64_t token, int64_t block) {
  alignas(64) uint32_t ctr[4][kPhiloxLanes];
  alignas(64) float z[4][kPhiloxLanes];
  const Philox4 c = philox_counter(step, token, block);
  for (int j = 0; j < 4; ++j) std::fill(ctr[j], ctr[j] + kPhiloxLanes, c.v[j]);
  philox_normal_lanes(z, ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int j = 0; j < 4; ++j) out[j] = z[j][0];
}

}  // namespace moe::detail
