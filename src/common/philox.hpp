// Counter-based normal noise: Philox-4x32-10 (Salmon et al. 2011) keyed by the seed, with the
// counter (expert / 4, token lo, token hi, step mod 2^32), then Box–Muller on the four words.
// One (seed, step, token, expert) gives one ε, whatever thread, batch split or process asks.
//
// Every ε anywhere in libmoe comes out of philox_normal_lanes, compiled once (common/philox.cpp)
// and vectorised across 16 independent counters. Each lane runs the same instructions, so a
// value never depends on which lane, batch or thread computed it, and the reference router,
// the fast router and the scalar moe::philox_normal agree bit for bit.
#pragma once
#include <cstdint>

namespace moe::detail {

struct Philox4 {
  uint32_t v[4];
};

// One Philox-4x32-10 block, scalar: the plain twin of the lanes version, used by tests.
inline Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{kM0} * ctr.v[0];
    const uint64_t p1 = uint64_t{kM1} * ctr.v[2];
    ctr = Philox4{{static_cast<uint32_t>(p1 >> 32) ^ ctr.v[1] ^ k0, static_cast<uint32_t>(p1),
                   static_cast<uint32_t>(p0 >> 32) ^ ctr.v[3] ^ k1, static_cast<uint32_t>(p0)}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// The counter of experts 4·block … 4·block+3 of one token.
inline Philox4 philox_counter(uint64_t step, int64_t token, int64_t block) {
  const uint64_t t = static_cast<uint64_t>(token);
  return Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(t),
                  static_cast<uint32_t>(t >> 32), static_cast<uint32_t>(step)}};
}

// Box–Muller's uniforms from two Philox words: u1 in (0, 1] so that ln u1 is finite, u2 in
// [0, 1), both multiples of 2^-24.
inline float philox_u1(uint32_t w) {
  return static_cast<float>(static_cast<int32_t>(w >> 8) + 1) * 5.9604644775390625e-8f;
}
inline float philox_u2(uint32_t w) {
  return static_cast<float>(static_cast<int32_t>(w >> 8)) * 5.9604644775390625e-8f;
}

constexpr int kPhiloxLanes = 16;

// For 16 independent counters ctr[word][lane] under key (k0, k1): z[j][lane] is the normal
// from word j of that lane's Philox output (words 0, 1 are one Box–Muller pair: √(-2 ln u1)
// times cos, sin of 2π·u2; words 2, 3 the other).
void philox_normal_lanes(float z[4][kPhiloxLanes], const uint32_t ctr[4][kPhiloxLanes],
                         uint32_t k0, uint32_t k1);

// ε (n_tok, E), row stride ld, for the global tokens token0 … token0 + n_tok - 1.
void philox_normal_rows(float* eps, int64_t ld, int64_t n_tok, int64_t E, uint64_t seed,
                        uint64_t step, int64_t token0);

// Four normals for experts 4·block … 4·block+3 of one token (the words of one Philox block).
void philox_normal4(float out[4], uint64_t seed, uint64_t step, int64_t token, int64_t block);

// ε for experts [0, E) of one token into row (E).
inline void philox_normal_row(float* row, int64_t E, uint64_t seed, uint64_t step,
                              int64_t token) {
  philox_normal_rows(row, E, 1, E, seed, step, token);
}

}  // namespace moe::detail
