// The two formats read as stored: their views and owning copies.
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

}  // namespace moe::detail
