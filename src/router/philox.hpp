// Counter-based normal noise: Philox-4x32-10 (Salmon et al. 2011) keyed by the seed, with the
// counter (expert / 4, token lo, token hi, step), then Box–Muller on the four words. One
// (seed, step, token, expert) gives one ε, whatever thread or process asks for it.
#pragma once
#include <cmath>
#include <cstdint>

namespace moe::detail {

struct Philox4 {
  uint32_t v[4];
};

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

// Four standard normals for experts 4·block … 4·block+3 of one token.
inline void philox_normal4(float out[4], uint64_t seed, uint64_t step, int64_t token,
                           int64_t block) {
  const uint64_t t = static_cast<uint64_t>(token);
  const Philox4 r = philox4x32_10(
      Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(t), static_cast<uint32_t>(t >> 32),
               static_cast<uint32_t>(step)}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr float kInv32 = 2.3283064365386963e-10f;  // 2^-32
  constexpr float kTwoPi = 6.28318530717958647692f;
  for (int pair = 0; pair < 2; ++pair) {
    // u1 in (0, 1] so that log never sees 0; u2 in [0, 1).
    const float u1 = (static_cast<float>(r.v[2 * pair] >> 8) + 1.0f) * (kInv32 * 256.0f);
    const float u2 = static_cast<float>(r.v[2 * pair + 1] >> 8) * (kInv32 * 256.0f);
    const float rad = std::sqrt(-2.0f * std::log(u1));
    out[2 * pair] = rad * std::cos(kTwoPi * u2);
    out[2 * pair + 1] = rad * std::sin(kTwoPi * u2);
  }
}

// ε for experts [0, E) of one token into row (E).
inline void philox_normal_row(float* row, int64_t E, uint64_t seed, uint64_t step,
                              int64_t token) {
  float z[4];
  for (int64_t b = 0; b * 4 < E; ++b) {
    philox_normal4(z, seed, step, token, b);
    for (int64_t j = 0; j < 4 && 4 * b + j < E; ++j) row[4 * b + j] = z[j];
  }
}

}  // namespace moe::detail
