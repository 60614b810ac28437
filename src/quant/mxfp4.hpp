// precision "mxfp4" (SPEC §6, evaluation only): OCP MX FP4 — E2M1 codes, one E8M0 scale per 32
// values along K — as GPT-OSS stores its experts, read in place:
//   <name>_blocks  uint8 (…, N, K/32, 16)  column (output) j, block b: 16 bytes, value 2i in
//                                          the low nibble of byte i, 2i + 1 in the high one
//   <name>_scales  uint8 (…, N, K/32)      2^(s − 127)
//   W[k][j] = e2m1(code) · 2^(scales[j][k/32] − 127)
// (transformers' convert_moe_packed_tensors dequantizes exactly this, then transposes to
// (K, N)). One expert's matrix is a view of its slice: code_stride 16·ceil(K/32) bytes, no
// copy. 4.25 bits a weight.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant/quant_matrix.hpp"

namespace moe::detail {

struct Mxfp4Kernel {
  static constexpr QuantFormatId kFormat = QuantFormatId::mxfp4;

  // The view of stored bytes: blocks (N, ceil(K/32), 16), scales (N, ceil(K/32)).
  static QuantMatrix view(const uint8_t* blocks, const uint8_t* scales, int64_t K, int64_t N);

  // An owning copy in the same layout (tests, benchmarks, and weights made by libmoe).
  struct Weights {
    int64_t K = 0, N = 0;
    std::vector<uint8_t> blocks, scales;
    void resize(int64_t K_, int64_t N_);
    QuantMatrix view() const { return Mxfp4Kernel::view(blocks.data(), scales.data(), K, N); }
  };

  static const QuantFormat& format() { return quant_format(kFormat); }
  static std::string name(QuantPath path);
};

// W (K, N) fp32 row-major → MXFP4 as the OCP MX specification (v1.0, §6.3) quantizes: per
// column and block of 32 along K, the scale 2^(⌊log2 max|w|⌋ − 2) (E2M1's largest exponent
// is 2), each w / scale rounded to the nearest E2M1 value, ties to the even code, beyond ±6
// saturated to ±6; an all-zero block keeps scale 2^0. Non-finite weights are moe::Error
// naming the column and block.
Mxfp4Kernel::Weights quantize_mxfp4(const float* W, int64_t K, int64_t N);

}  // namespace moe::detail
