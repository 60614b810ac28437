#include "quant/int4.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>

#include "common/check.hpp"
#include "quant/kernels.hpp"

namespace moe::detail {

void Int4Kernel::Weights::resize(int64_t K_, int64_t N_, int64_t group_, bool zero_points_) {
  K = K_;
  N = N_;
  group = group_;
  zero_points = zero_points_;
  const uint8_t zero_code = 8 | 8 << 4;  // the codes of a zero weight (z = 8 until set)
  codes.assign(static_cast<size_t>(N * padded_k() / 2), zero_code);
  scales.assign(static_cast<size_t>(N * groups()), 0);
  zeros.assign(zero_points ? static_cast<size_t>(N * groups()) : 0, 8);
  perm.clear();
}

QuantMatrix Int4Kernel::Weights::view() const {
  QuantMatrix m;
  m.format = QuantFormatId::int4;
  m.K = K;
  m.N = N;
  m.block_k = group;
  m.codes = codes.data();
  m.code_stride = padded_k() / 2;
  m.scales = scales.data();
  m.scale_stride = groups();
  m.zero_points = zero_points;
  m.zeros = zero_points ? zeros.data() : nullptr;
  m.zero_stride = zero_points ? groups() : 0;
  m.act_order = !perm.empty();
  m.perm = perm.empty() ? nullptr : perm.data();
  return m;
}

std::string Int4Kernel::name(const Weights& w, QuantPath path) {
  return quant_kernel_name(w.view(), path);
}

namespace {

// One group's candidate: the codes it gives and its squared error, for a scale already
// rounded to fp16 and a zero point.
struct Candidate {
  uint16_t scale = 0;
  int zero = 8;
  double err = 0.0;
};

int quantize_code(float w, float inv, int zero) {
  const float r = std::nearbyint(w * inv) + static_cast<float>(zero);
  return static_cast<int>(std::clamp(r, 0.0f, 15.0f));
}

double group_error(const float* w, int64_t n, int64_t stride, uint16_t scale16, int zero) {
  const float s = f16_to_f32(scale16);
  if (s == 0.0f) {
    double e = 0.0;
    for (int64_t i = 0; i < n; ++i) e += static_cast<double>(w[i * stride]) * w[i * stride];
    return e;
  }
  const float inv = 1.0f / s;
  double e = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = w[i * stride];
    const double d = static_cast<double>(quantize_code(x, inv, zero) - zero) * s - x;
    e += d * d;
  }
  return e;
}

// The clipping ranges tried per group (fractions of the full range).
constexpr float kClip[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f, 0.65f, 0.6f, 0.55f, 0.5f};

Candidate best_candidate(const float* w, int64_t n, int64_t stride, bool zero_points, bool search) {
  float lo = 0.0f, hi = 0.0f, extreme = 0.0f;  // extreme: the value of largest magnitude
  for (int64_t i = 0; i < n; ++i) {
    const float x = w[i * stride];
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    if (std::fabs(x) > std::fabs(extreme)) extreme = x;
  }
  Candidate best;
  best.err = -1.0;
  auto consider = [&](float scale, int zero) {
    const uint16_t s16 = f32_to_f16(scale);
    const double e = group_error(w, n, stride, s16, zero);
    if (best.err < 0.0 || e < best.err) best = {s16, zero, e};
  };
  const int tries = search ? static_cast<int>(std::size(kClip)) : 1;
  for (int t = 0; t < tries; ++t) {
    const float c = kClip[t];
    if (zero_points) {
      // The range [c·lo, c·hi] (it holds 0: a zero weight stays exact) over the 15 steps.
      const float s = c * (hi - lo) / 15.0f;
      const int z = s > 0.0f ? static_cast<int>(std::clamp(std::nearbyint(-c * lo / s), 0.0f, 15.0f)) : 8;
      consider(s, z);
    } else {
      // The extreme value onto code 0 (−8 · s, the scale's sign follows it, as ggml's Q4_0),
      // or the largest magnitude onto ±7.
      consider(-c * extreme / 8.0f, 8);
      if (search) consider(c * std::fabs(extreme) / 7.0f, 8);
    }
  }
  if (!search) return best;
  // Then the least-squares scale for the codes the best candidate chose, twice.
  for (int round = 0; round < 2; ++round) {
    const float s = f16_to_f32(best.scale);
    if (s == 0.0f) break;
    const float inv = 1.0f / s;
    double wq = 0.0, qq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double q = quantize_code(w[i * stride], inv, best.zero) - best.zero;
      wq += q * w[i * stride];
      qq += q * q;
    }
    if (qq > 0.0) consider(static_cast<float>(wq / qq), best.zero);
  }
  return best;
}

}  // namespace

Int4Kernel::Weights quantize_int4(const float* W, int64_t K, int64_t N, const Int4Options& opt) {
  MOE_REQUIRE(opt.group == 32 || opt.group == 64 || opt.group == 128,
              "int4: group must be 32, 64 or 128, got ", opt.group);
  MOE_REQUIRE(K > 0 && N > 0, "int4: K and N must be positive, got K = ", K, ", N = ", N);
  Int4Kernel::Weights q;
  q.resize(K, N, opt.group, opt.zero_points);
  const int64_t G = q.groups();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j)
      MOE_REQUIRE(std::isfinite(W[k * N + j]), "int4: weight (", k, ", ", j,
                  ") is not finite: ", W[k * N + j]);
  std::string error;
#pragma omp parallel for schedule(static) if (K * N >= (int64_t{1} << 16))
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * opt.group, n = std::min(opt.group, K - k0);
      const Candidate c = best_candidate(W + k0 * N + j, n, N, opt.zero_points, opt.search);
      const float s = f16_to_f32(c.scale);
      if (!std::isfinite(s)) {
#pragma omp critical(moe_int4_error)
        if (error.empty())
          error = cat("int4: column ", j, ", group ", g, ": the scale ", s,
                      " is beyond fp16 (weights up to ", 65504.0 * 8, " are representable)");
        continue;
      }
      q.scales[static_cast<size_t>(j * G + g)] = c.scale;
      if (opt.zero_points) q.zeros[static_cast<size_t>(j * G + g)] = static_cast<uint8_t>(c.zero);
      const float inv = s != 0.0f ? 1.0f / s : 0.0f;
      for (int64_t i = 0; i < n; ++i)
        q.set_code(k0 + i, j, static_cast<uint8_t>(s != 0.0f ? quantize_code(W[(k0 + i) * N + j], inv, c.zero) : c.zero));
      for (int64_t r = k0 + n; r < (g + 1) * opt.group; ++r)  // the padding: zero weights
        q.set_code(r, j, static_cast<uint8_t>(c.zero));
    }
  }
  MOE_REQUIRE(error.empty(), error);
  return q;
}

}  // namespace moe::detail
