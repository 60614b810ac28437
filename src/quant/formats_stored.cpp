// The two formats read as stored: their views, owning copies and quantizers.
#include <algorithm>
#include <cmath>

#include "common/check.hpp"
#include "quant/fp8.hpp"
#include "quant/kernels.hpp"
#include "quant/mxfp4.hpp"

namespace moe::detail {

QuantMatrix Mxfp4Kernel::view(const uint8_t* blocks, const uint8_t* scales, int64_t K, int64_t N) {
  QuantMatrix m;
  m.format = kFormat;
  m.K = K;
  m.N = N;
  m.block_k = 32;
  m.codes = blocks;
  m.code_stride = (K + 31) / 32 * 16;
  m.scales = scales;
  m.scale_stride = (K + 31) / 32;
  return m;
}

void Mxfp4Kernel::Weights::resize(int64_t K_, int64_t N_) {
  K = K_;
  N = N_;
  blocks.assign(static_cast<size_t>(N * ((K + 31) / 32) * 16), 0);
  scales.assign(static_cast<size_t>(N * ((K + 31) / 32)), 127);
}

std::string Mxfp4Kernel::name(QuantPath path) {
  Weights w;
  w.resize(32, 1);
  return quant_kernel_name(w.view(), path);
}

QuantMatrix Fp8Kernel::view(const uint8_t* weight, int64_t ldw, const float* scale_inv, int64_t K,
                            int64_t N) {
  QuantMatrix m;
  m.format = kFormat;
  m.K = K;
  m.N = N;
  m.block_k = 128;
  m.codes = weight;
  m.code_stride = ldw;
  m.scales = scale_inv;
  m.scale_stride = (K + 127) / 128;
  return m;
}

void Fp8Kernel::Weights::resize(int64_t K_, int64_t N_) {
  K = K_;
  N = N_;
  weight.assign(static_cast<size_t>(N * K), 0);
  scale_inv.assign(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)), 1.0f);
}

std::string Fp8Kernel::name(QuantPath path) {
  Weights w;
  w.resize(32, 1);
  return quant_kernel_name(w.view(), path);
}

namespace {

// The code (0..7, sign apart) of the E2M1 magnitude nearest m ≥ 0, ties to the even code;
// beyond 6 it is 6's.
uint8_t e2m1_magnitude_code(float m) {
  constexpr float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  uint8_t best = 7;
  for (uint8_t c = 0; c < 7; ++c) {
    const float mid = 0.5f * (kMag[c] + kMag[c + 1]);
    if (m < mid || (m == mid && c % 2 == 0)) {
      best = c;
      break;
    }
  }
  return best;
}

}  // namespace

Mxfp4Kernel::Weights quantize_mxfp4(const float* W, int64_t K, int64_t N) {
  Mxfp4Kernel::Weights q;
  q.resize(K, N);
  const int64_t S = (K + 31) / 32;
  for (int64_t j = 0; j < N; ++j)
    for (int64_t b = 0; b < S; ++b) {
      const int64_t k0 = b * 32, k1 = std::min(K, k0 + 32);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = W[k * N + j];
        MOE_REQUIRE(std::isfinite(v), "mxfp4: weight (", k, ", ", j, ") is not finite (column ",
                    j, ", block ", b, ")");
        amax = std::max(amax, std::fabs(v));
      }
      // 2^(⌊log2 amax⌋ − 2), its exponent within E8M0's −127..127.
      const int e = amax > 0.0f ? std::clamp(std::ilogb(amax) - 2, -127, 127) : 0;
      q.scales[static_cast<size_t>(j * S + b)] = static_cast<uint8_t>(e + 127);
      const float inv = std::ldexp(1.0f, -e);
      for (int64_t k = k0; k < k1; ++k) {
        const float v = W[k * N + j] * inv;
        const uint8_t c = static_cast<uint8_t>(e2m1_magnitude_code(std::fabs(v)) |
                                               (std::signbit(v) && v != 0.0f ? 8 : 0));
        uint8_t& byte = q.blocks[static_cast<size_t>(j * S * 16 + (k - k0 + b * 32) / 2)];
        byte = (k % 2) ? static_cast<uint8_t>((byte & 0x0f) | c << 4)
                       : static_cast<uint8_t>((byte & 0xf0) | c);
      }
    }
  return q;
}

uint8_t e4m3_code(float v) {
  // The 127 finite magnitudes of E4M3 (codes 0..126) ascend with the code.
  static const std::array<float, 127> mag = [] {
    std::array<float, 127> m{};
    for (int c = 0; c < 127; ++c) m[static_cast<size_t>(c)] = e4m3_value(c);
    return m;
  }();
  const float a = std::fabs(v);
  const auto it = std::lower_bound(mag.begin(), mag.end(), a);
  int c;
  if (it == mag.end()) {
    c = 126;  // beyond 448: saturated
  } else {
    c = static_cast<int>(it - mag.begin());  // mag[c] ≥ a
    if (c > 0) {
      const float lo = mag[static_cast<size_t>(c - 1)], hi = mag[static_cast<size_t>(c)];
      if (a - lo < hi - a || (a - lo == hi - a && (c - 1) % 2 == 0)) --c;
    }
  }
  return static_cast<uint8_t>(c | (std::signbit(v) && c != 0 ? 0x80 : 0));
}

Fp8Kernel::Weights quantize_fp8(const float* W, int64_t K, int64_t N) {
  Fp8Kernel::Weights q;
  q.resize(K, N);
  const int64_t BK = (K + 127) / 128, BN = (N + 127) / 128;
  for (int64_t r = 0; r < BN; ++r)
    for (int64_t b = 0; b < BK; ++b) {
      const int64_t j0 = r * 128, j1 = std::min(N, j0 + 128);
      const int64_t k0 = b * 128, k1 = std::min(K, k0 + 128);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t j = j0; j < j1; ++j) {
          const float v = W[k * N + j];
          MOE_REQUIRE(std::isfinite(v), "fp8: weight (", k, ", ", j,
                      ") is not finite (block ", r, ", ", b, ")");
          amax = std::max(amax, std::fabs(v));
        }
      const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
      q.scale_inv[static_cast<size_t>(r * BK + b)] = scale;
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t j = j0; j < j1; ++j)
          q.weight[static_cast<size_t>(j * K + k)] = e4m3_code(W[k * N + j] / scale);
    }
  return q;
}

}  // namespace moe::detail
