// The precision state of one stack of experts (SPEC §6): the weights in the layer's
// precision beside the fp32 masters (or instead of them, in a layer without masters) and the
// products' operands in that precision. The routed layer, its shared experts and an
// expert-parallel rank's local experts each own one and hand it to experts_forward /
// experts_backward; those never see a pair of nullable bf16/int8 pointers.
//   fp32  nothing is held: the products read the masters;
//   bf16  packed bf16 copies (ExpertWeightsBf16) and bf16 operands (ExpertScratchBf16);
//   int8  quantized copies (ExpertWeightsInt8) and quantized rows (ExpertScratchInt8);
//   int4, mxfp4, fp8  the matrices in their low-bit format (ExpertWeightsQuant) and the
//         low-bit kernels' workspace (experts/lowbit.hpp).
#pragma once
#include <cstdint>

#include "experts/experts.hpp"
#include "experts/int8.hpp"
#include "experts/lowbit.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

class ExpertPrecision {
 public:
  Precision precision = Precision::fp32;

  ExpertWeightsBf16 bf16;
  ExpertScratchBf16 bf16_ops;
  ExpertWeightsInt8 int8;
  ExpertScratchInt8 int8_ops;
  ExpertWeightsQuant quant;
  ExpertScratchQuant quant_ops;

  bool is_bf16() const { return precision == Precision::bf16; }
  bool is_int8() const { return precision == Precision::int8; }
  bool is_low_bit() const { return low_bit(precision); }

  // The layer's precision and how libmoe quantizes int4 (its config).
  void configure(const MoEConfig& cfg) {
    precision = cfg.precision;
    quant.precision = low_bit(cfg.precision) ? cfg.precision : Precision::int4;
    quant.int4 = Int4Options{cfg.int4_group, cfg.int4_zero_points, true};
  }
  // The masters may have changed: the copies are made again when next needed.
  void invalidate() {
    bf16.invalidate();
    int8.invalidate();
    quant.invalidate();
  }
  // No masters: the copies, sized for s, are the weights (zeroed, or with zero = false left
  // for a caller that assigns every expert matrix, bf16 only).
  void hold_only(const ExpertShape& s, bool zero);
  // No masters: expert e's matrix (1: W1, 2: W2, 3: W3) from its fp32 values ((K, N)
  // row-major), rounded or quantized into the copies.
  void assign(int matrix, int64_t e, const float* src, const ExpertShape& s);
  // The same from bf16 values, element (i, o) at src[i·s_in + o·s_out]; bf16 copies only.
  void assign_bf16(int matrix, int64_t e, const uint16_t* src, int64_t s_in, int64_t s_out,
                   const ExpertShape& s);
  // The same from stored low-bit bytes in the layer's format (a checkpoint's tensors, copied
  // as they are); low-bit precisions only.
  void assign_stored(int matrix, int64_t e, const QuantMatrix& v, const ExpertShape& s);
  // out (E, K, N) = the values the copies hold for matrix 1, 2 or 3, as fp32.
  void read(int matrix, float* out, const ExpertShape& s) const;
  // Makes the copies from the masters w once more and keeps them as the weights (the
  // layer drops its masters after this).
  void fix_from(const ExpertWeights& w, const ExpertShape& s);
  // Bytes the expert matrices take in this precision (0 for fp32: the masters).
  int64_t held_bytes() const;
};

}  // namespace moe::detail
