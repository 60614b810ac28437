// precision "fp8" (SPEC §6, evaluation only): E4M3 (float8_e4m3fn) weights with one fp32 scale
// per 128 × 128 block, as DeepSeek-V3 and Qwen3-*-FP8 store them, read in place:
//   <name>.weight            float8_e4m3fn (N, K)   (torch's (out, in))
//   <name>.weight_scale_inv  float32 (ceil(N/128), ceil(K/128))
//   W[k][j] = e4m3(weight[j][k]) · weight_scale_inv[j/128][k/128]
// (the "inv" is the checkpoint's name: the stored number multiplies). One byte a weight plus
// 4 bytes per 16384.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant/quant_matrix.hpp"

namespace moe::detail {

struct Fp8Kernel {
  static constexpr QuantFormatId kFormat = QuantFormatId::fp8;

  // The view of stored bytes: weight (N, K) E4M3 with row stride ldw ≥ K bytes (K when
  // stored), scale_inv (ceil(N/128), ceil(K/128)) fp32.
  static QuantMatrix view(const uint8_t* weight, int64_t ldw, const float* scale_inv, int64_t K,
                          int64_t N);

  struct Weights {
    int64_t K = 0, N = 0;
    std::vector<uint8_t> weight;
    std::vector<float> scale_inv;
    void resize(int64_t K_, int64_t N_);
    QuantMatrix view() const { return Fp8Kernel::view(weight.data(), K, scale_inv.data(), K, N); }
  };

  static const QuantFormat& format() { return quant_format(kFormat); }
  static std::string name(QuantPath path);
};

// W (K, N) fp32 row-major → FP8 as DeepSeek-V3's block quantization does: per 128 × 128 block
// the fp32 scale max|w| / 448 (E4M3's largest value; 1 for an all-zero block), each w / scale
// rounded to the nearest E4M3 value, ties to the even code. Non-finite weights are moe::Error
// naming the block.
Fp8Kernel::Weights quantize_fp8(const float* W, int64_t K, int64_t N);

// The nearest E4M3 code of v (|v| ≤ 448 after rounding, else saturated), ties to even.
uint8_t e4m3_code(float v);

}  // namespace moe::detail
