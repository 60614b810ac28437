// The low-bit precisions of a stack of experts (SPEC §6: "int4", "mxfp4", "fp8"; evaluation
// only): each expert matrix held in its format's stored bytes (quant/format.hpp) — made from
// the fp32 masters by libmoe's quantizers, or copied as a checkpoint stores it — and the
// expert products run by the low-bit kernels (quant/kernels.hpp): decode for an expert's
// few rows, prefill through widened bf16 panels for many. What each format is and what was
// measured: docs/quant.md.
#pragma once
#include <cstdint>
#include <vector>

#include "experts/experts.hpp"
#include "quant/int4.hpp"
#include "quant/kernels.hpp"

namespace moe::detail {

// One matrix in a low-bit format, owning its bytes: m views the vectors (dense strides).
struct QuantHeld {
  QuantMatrix m;
  QuantBytes codes, scales, zeros;
  std::vector<int32_t> perm;

  QuantHeld() = default;
  QuantHeld(const QuantHeld& o) { adopt(o.m); }
  QuantHeld& operator=(const QuantHeld& o) {
    if (this != &o) adopt(o.m);
    return *this;
  }
  QuantHeld(QuantHeld&&) = default;  // vectors keep their buffers: m stays valid
  QuantHeld& operator=(QuantHeld&&) = default;

  // Copies the bytes a view reads (codes, scales, zero points, act-order permutation) into
  // this matrix's own storage, checked by validate(). A checkpoint's mapped tensors become
  // the weights this way, with no wider copy of the matrix.
  void adopt(const QuantMatrix& v);
  int64_t bytes() const { return m.codes ? m.stored_bytes() : 0; }
};

// W (K, N) fp32 row-major → the format of precision p (int4 with opt).
QuantHeld quantize_matrix(Precision p, const Int4Options& opt, const float* W, int64_t K,
                          int64_t N);
QuantFormatId quant_format_of(Precision p);
// The bytes one (K, N) matrix takes in precision p (codes, scales, zero points): what a full
// read of it touches (the decode's memory roof).
int64_t lowbit_matrix_bytes(Precision p, const Int4Options& opt, int64_t K, int64_t N);

struct ExpertWeightsQuant {
  Precision precision = Precision::int4;
  Int4Options int4;  // how libmoe quantizes int4
  std::vector<QuantHeld> W1, W2, W3;  // one per expert (W2 empty for linear_relu, W3 but glu)
  bool ready = false;
  bool fixed = false;  // no masters: these are the weights, never made again

  void invalidate() {
    if (!fixed) ready = false;
  }
  // E zero matrices of each kind the shape has.
  void shape(const ExpertShape& s);
  // No masters: the matrices sized for s (zero until assigned) are the weights.
  void hold_only(const ExpertShape& s) {
    shape(s);
    ready = fixed = true;
  }
  // Quantizes every matrix from the masters unless ready (experts in parallel).
  void prepare(const ExpertWeights& w, const ExpertShape& s);
  // Expert e's matrix 1 (W1), 2 (W2) or 3 (W3) quantized from its fp32 (K, N) values.
  void assign(int matrix, int64_t e, const float* src, const ExpertShape& s);
  // ... or copied from stored bytes in this precision's format (a checkpoint's tensors);
  // moe::Error when the format or the shape is not the layer's.
  void assign_stored(int matrix, int64_t e, const QuantMatrix& v, const ExpertShape& s);
  // out (E, K, N) = the dequantized values (what a float64 oracle multiplies), as fp32.
  void read(int matrix, float* out, const ExpertShape& s) const;
  int64_t bytes() const;
  std::vector<QuantHeld>& stack(int matrix) { return matrix == 1 ? W1 : matrix == 2 ? W2 : W3; }
  const std::vector<QuantHeld>& stack(int matrix) const {
    return matrix == 1 ? W1 : matrix == 2 ? W2 : W3;
  }
};

// What one expert's epilogues need (experts_forward_quant; lowbit.cpp).
struct QuantExpertEpilogue {
  const ExpertShape* s = nullptr;
  int64_t M = 0;
  float *a1 = nullptr, *a3 = nullptr, *hid = nullptr, *out = nullptr;
  const float *b1 = nullptr, *b2 = nullptr, *b3 = nullptr;
};

struct ExpertScratchQuant {
  QuantGroupWorkspace ws;
  std::vector<QuantProduct> products;      // reserved: one per expert and phase
  std::vector<QuantExpertEpilogue> epis;   // one per expert
};

// The kernels an expert product in precision p runs on this CPU (MOE_MAX_ISA included), at
// decode and at prefill, for reports: "decode int4_g128_sym:avx512_vnni (...); prefill ...".
std::string lowbit_kernel_names(Precision p, const Int4Options& opt = {});

// The low-bit forward of experts_forward: per expert with rows, its products by the decode
// kernel or the prefill kernel (quant_method_for: by the row count), spread over the threads
// by column tiles, W1 and W3 on the same rows; biases, activation and the glu product in fp32
// on each tile as it finishes, as in every precision.
// acts.out is assigned; acts.a1 (a3) and acts.hid hold the pre-activations and the hidden
// rows.
void experts_forward_quant(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                           const int64_t* offsets, const ExpertShape& s, ExpertWeightsQuant& wq,
                           ExpertScratchQuant& sc);

}  // namespace moe::detail
