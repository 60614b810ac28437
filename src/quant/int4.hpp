// precision "int4" (SPEC §6, evaluation only): 4-bit integer codes, group-wise along the input
// dimension K, one fp16 scale per (column, group) and optionally one zero point:
//   W[k][j] ≈ (q[k][j] − z[j][g]) · s[j][g],  g = k / group,  q, z in 0..15
// (symmetric: z = 8). The same layout holds libmoe's own quantizer's output and repacked GPTQ
// and AWQ checkpoints (quant/int4_import.hpp), so one kernel reads all three.
//
// Layout (Int4Kernel::Weights, N-major as quant/quant_matrix.hpp describes): codes (N, Kg/2)
// bytes with Kg = K rounded up to the group, the even k in the low nibble; scales (N, G) fp16,
// G = Kg / group; zeros (N, G) bytes when asymmetric; perm (K) for GPTQ act-order. Bytes per
// weight: 0.5 + 2/group (+ 1/group with zero points): 4.25 bits at group 128, 4.5 at 64.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant/quant_matrix.hpp"

namespace moe::detail {

// How libmoe quantizes: group size and symmetry (validated by quantize_int4).
struct Int4Options {
  int64_t group = 128;       // 32, 64 or 128
  bool zero_points = false;  // asymmetric (min/max) instead of symmetric
  bool search = true;        // false: the plain range (Q4_0's scale, or min/max) only
};

struct Int4Kernel {
  static constexpr QuantFormatId kFormat = QuantFormatId::int4;

  struct Weights {
    int64_t K = 0, N = 0;
    int64_t group = 0;  // K values per scale, a multiple of 32
    bool zero_points = false;
    std::vector<uint8_t> codes;    // (N, Kg / 2)
    std::vector<uint16_t> scales;  // (N, G) fp16
    std::vector<uint8_t> zeros;    // (N, G) when zero_points
    std::vector<int32_t> perm;     // (K) act-order (kernel position → W's row), else empty

    int64_t padded_k() const { return (K + group - 1) / group * group; }
    int64_t groups() const { return padded_k() / group; }
    // Sizes the arrays for (K, N) (codes z or 8, i.e. zero weights; scales 0).
    void resize(int64_t K_, int64_t N_, int64_t group_, bool zero_points_);
    QuantMatrix view() const;
    // The code at kernel position r of column j, and setting it.
    uint8_t code(int64_t r, int64_t j) const {
      const uint8_t b = codes[static_cast<size_t>(j * (padded_k() / 2) + r / 2)];
      return r % 2 ? b >> 4 : b & 15;
    }
    void set_code(int64_t r, int64_t j, uint8_t q) {
      uint8_t& b = codes[static_cast<size_t>(j * (padded_k() / 2) + r / 2)];
      b = r % 2 ? static_cast<uint8_t>((b & 0x0f) | q << 4) : static_cast<uint8_t>((b & 0xf0) | q);
    }
  };

  static const QuantFormat& format() { return quant_format(kFormat); }
  // "int4_g128_sym" / "int4_g64_zp" (+ "_act" for act-order), then ":" and the path's kernel.
  static std::string name(const Weights& w, QuantPath path);
};

// W (K, N) fp32 row-major (one expert's matrix, "in × out") → libmoe's int4. Per (column,
// group) it tries clipping ranges (the largest magnitude onto code 0 as ggml's Q4_0 does, or
// onto ±7; or min and max — each scaled by 1, 0.95, …, 0.5), then the least-squares scale of
// the best one's codes (twice); every candidate's scale is rounded to fp16 and the group
// quantized with that stored scale (nearest, ties to even, clamped to the codes); the smallest
// squared error wins. search = false keeps the plain range (the baseline the docs compare).
// Non-finite weights, and scales beyond fp16, are moe::Error naming the column and group.
Int4Kernel::Weights quantize_int4(const float* W, int64_t K, int64_t N, const Int4Options& opt);

}  // namespace moe::detail
