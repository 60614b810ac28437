// Stacked experts (SPEC §4) run over dispatched rows: rows [offsets[e], offsets[e+1]) of every
// (R, ·) buffer belong to expert e, and each expert is one GEMM per weight over only its rows.
// Experts without rows are never touched. Derivations: docs/math.md §experts.
#pragma once
#include <cstdint>

#include "common/parallel.hpp"
#include "experts/bf16.hpp"
#include "experts/grouped_gemm.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

struct ExpertShape {
  ExpertKind kind = ExpertKind::mlp;
  Activation act = Activation::relu;
  int64_t E = 0, d = 0, F = 0, Do = 0;  // F: hidden width (mlp, swiglu)
  static ExpertShape of(const MoEConfig& cfg) {
    return {cfg.expert, cfg.expert == ExpertKind::mlp ? cfg.activation : Activation::relu,
            cfg.n_experts, cfg.d_model, cfg.hidden(), cfg.out_dim()};
  }
};

// Stacked weights: linear_relu W1 (E, d, Do), b1 (E, Do); mlp W1 (E, d, F), b1 (E, F),
// W2 (E, F, Do), b2 (E, Do); swiglu W1 (E, d, F), W2 (E, F, Do), W3 (E, d, F). Biases may be
// null.
struct ExpertWeights {
  const float *W1 = nullptr, *b1 = nullptr, *W2 = nullptr, *b2 = nullptr, *W3 = nullptr;
};
struct ExpertGrads {  // same shapes, accumulated (+=)
  float *dW1 = nullptr, *db1 = nullptr, *dW2 = nullptr, *db2 = nullptr, *dW3 = nullptr;
};

// Activations saved by forward for backward, (R, ·) each.
struct ExpertActs {
  float* a1 = nullptr;   // (R, F) x·W1 + b1 (mlp, swiglu)
  float* a3 = nullptr;   // (R, F) x·W3 (swiglu)
  float* hid = nullptr;  // (R, F) act(a1) (mlp) or silu(a1)⊙a3 (swiglu)
  float* out = nullptr;  // (R, Do) expert output
};

// Scratch of backward, (R, ·) each.
struct ExpertScratch {
  float* dh = nullptr;   // (R, F) mlp, swiglu
  float* da3 = nullptr;  // (R, F) swiglu
};

// The stacked weights packed in bf16 (evaluation only); null members: use fp32.
struct ExpertWeightsBf16 {
  const PackedBf16 *W1 = nullptr, *W2 = nullptr, *W3 = nullptr;
};

// acts.out is assigned from xg (R, d). With wb, the products use the bf16 weights (biases
// and activations stay fp32).
void experts_forward(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                     const int64_t* offsets, const ExpertShape& s, GroupedGemm& gg,
                     const ExpertWeightsBf16* wb = nullptr);

// dxg (R, d) is assigned; dout (R, Do) is the gradient of acts.out and is used as scratch
// (overwritten). Parameter gradients accumulate.
void experts_backward(float* dxg, ExpertGrads& g, float* dout, ExpertScratch& scr,
                      const ExpertActs& acts, const float* xg, const ExpertWeights& w,
                      const int64_t* offsets, const ExpertShape& s, GroupedGemm& gg);

}  // namespace moe::detail
