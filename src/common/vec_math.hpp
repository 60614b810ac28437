// Branch-free float32 exp, log, sqrt and sincos(2πu) that the compiler can vectorise inside
// `#pragma omp simd` loops. libm's scalar calls (and std::sqrt, which keeps an errno path
// without -fno-math-errno) stop GCC from vectorising the noise and softmax loops; these
// stay within a few ulp of the correctly rounded result on the domains the router uses.
// Each is written so that every lane runs the same instructions: a value's result never
// depends on its position in a loop, which keeps routing bit-identical across batch splits.
#pragma once
#include <bit>
#include <cstdint>

namespace moe::detail {

// c ? a : b without a branch. A plain ?: lets GCC sink one side's arithmetic into a branch,
// and under the default -ftrapping-math it then refuses to if-convert (and so to vectorise)
// a loop whose float operations became conditional.
inline float select_f32(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return std::bit_cast<float>((std::bit_cast<int32_t>(a) & m) | (std::bit_cast<int32_t>(b) & ~m));
}
inline float abs_f32(float x) { return std::bit_cast<float>(std::bit_cast<int32_t>(x) & 0x7fffffff); }

// e^x for x ≤ 0 (softmax after subtracting the row max, softplus's e^{-|z|}); e^x < 2^-126
// (x < -87) flushes to 0 rather than to a denormal. NaN propagates.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 with its low 13 bits cleared: n·hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  // Clamp to [-87, 0]; NaN → -87, so that the integer conversion below is always defined.
  const float xc = select_f32(x > 0.0f, 0.0f, select_f32(x >= -87.0f, x, -87.0f));
  const float n = (xc * kLog2e + kRound) - kRound;  // round(x / ln 2), in [-126, 0]
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;   // |r| ≤ ln2/2
  // Taylor to degree 7: the truncation error r^8/8! < 5e-9 is below float's half ulp.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float y = p * scale;
  return select_f32(x < -87.0f, 0.0f, select_f32(x != x, x, y));
}

// ln x for finite x ≥ 2^-126 (normal numbers). x = 2^e·m with m in [√½, √2); ln m = 2·atanh(s),
// s = (m-1)/(m+1), |s| ≤ 0.172, summed to s^9 (next term < 2e-9 relative).
inline float log_f32(float x) {
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  const int32_t bits = std::bit_cast<int32_t>(x);
  const int32_t e = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3 = √½: m lands in [√½, √2)
  const float m = std::bit_cast<float>(bits - (e << 23));
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  float q = 1.0f / 9.0f;
  q = q * z + 1.0f / 7.0f;
  q = q * z + 1.0f / 5.0f;
  q = q * z + 1.0f / 3.0f;
  const float ef = static_cast<float>(e);
  // ln m = 2s + 2s·z·q = f - (f - 2s) + ...: written as f - s·(f - z·2q) keeps the small
  // correction separate from the leading f, which is exact.
  const float lnm = f - s * (f - 2.0f * z * q);
  return ef * kLn2Hi + (ef * kLn2Lo + lnm);
}

// ln(1 + y) for y in [0, 1]: ln(u)·y/(u-1) with u = 1 + y cancels u's rounding error.
inline float log1p_f32(float y) {
  const float u = 1.0f + y;
  const float d = u - 1.0f;
  return select_f32(d == 0.0f, y, log_f32(u) * (y / select_f32(d == 0.0f, 1.0f, d)));
}

// softplus(z) = max(z, 0) + ln(1 + e^{-|z|}), never overflowing. NaN propagates.
inline float softplus_f32(float z) {
  const float a = abs_f32(z);
  const float pos = select_f32(z > 0.0f, z, 0.0f);
  return select_f32(z != z, z, pos + log1p_f32(exp_f32(-a)));
}

// √x for x in [0, 2^64): two Newton steps on 1/√x from the bit-level first guess
// (relative error 3.4e-3 → 1.7e-5 → 4e-10 before rounding), then x·(1/√x).
inline float sqrt_f32(float x) {
  float y = std::bit_cast<float>(0x5f375a86 - (std::bit_cast<int32_t>(x) >> 1));
  const float hx = 0.5f * x;
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  return x * y;  // x = 0 gives 0: y is large but finite
}

// sin(2πu) and cos(2πu) for u in [0, 1): u = q/4 + r exactly (u is a multiple of 2^-24),
// θ = 2πr in [-π/4, π/4], then the quadrant q rotates (sin θ, cos θ).
inline void sincos2pi_f32(float u, float& s_out, float& c_out) {
  constexpr float kRound = 12582912.0f;
  constexpr float kTwoPi = 6.28318530717958647692f;
  const float q = (4.0f * u + kRound) - kRound;
  const float r = u - 0.25f * q;
  const float t = kTwoPi * r;
  const float t2 = t * t;
  // Taylor to θ^9 and θ^10: truncation < 2e-9 on [-π/4, π/4].
  float ps = -1.0f / 39916800.0f;
  ps = ps * t2 + 1.0f / 362880.0f;
  ps = ps * t2 - 1.0f / 5040.0f;
  ps = ps * t2 + 1.0f / 120.0f;
  ps = ps * t2 - 1.0f / 6.0f;
  const float sn = t + t * t2 * ps;
  float pc = -1.0f / 3628800.0f;
  pc = pc * t2 + 1.0f / 40320.0f;
  pc = pc * t2 - 1.0f / 720.0f;
  pc = pc * t2 + 1.0f / 24.0f;
  pc = pc * t2 - 0.5f;
  const float cs = 1.0f + t2 * pc;
  const int32_t qi = static_cast<int32_t>(q) & 3;
  const float s_sw = select_f32((qi & 1) != 0, cs, sn);
  const float c_sw = select_f32((qi & 1) != 0, sn, cs);
  s_out = select_f32(qi >= 2, -s_sw, s_sw);
  c_out = select_f32(qi == 1 || qi == 2, -c_sw, c_sw);
}

}  // namespace moe::detail
