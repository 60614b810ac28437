// Many independent GEMMs (one per expert) run as one parallel loop over fixed-size output
// tiles. Each tile is a serial oneDNN sgemm over the full reduction dimension, and the tiling
// depends only on the shapes, never on the thread count: the results are bit-identical for
// any OMP_NUM_THREADS (the same argument as common/gemm.hpp).
#pragma once
#include <cstdint>
#include <vector>

#include "moe/layer.hpp"

namespace moe::detail {

// Elementwise work applied to each output tile of C right after its sgemm, on the thread
// that computed it, while the tile is still in cache: it saves a separate pass over the
// whole output. B1 forward with it ×0.962 at 512×256 tiles, ×0.983 at 1024×1024 (medians
// of 16 interleaved rounds). Forward only: the backward's activation gradient fused the same
// way into the tiles producing dh measured 1–2% slower on B1 (×1.011 over 20 rounds), so
// backward keeps its separate pass. Each value goes through the same operations in the same order as in a
// separate pass, so results do not depend on the tiling or the thread count.
// Arrays marked "like C" have C's layout: element (i, j) at [i·ldc + j].
struct TileEpilogue {
  enum class Op {
    none,
    bias,             // C += bias
    bias_act,         // C += bias; out = act(C)
    bias_act_inplace, // C = act(C + bias)
    glu,              // C += bias, C2 += bias2; out = silu(C)·C2, or clamped_swiglu(C, C2)
  };
  Op op = Op::none;
  Activation act = Activation::relu;
  const float* bias = nullptr;  // (N); null: no bias
  float* out = nullptr;         // like C
  uint16_t* out_bf16 = nullptr; // like C: act(C) rounded to bf16, the next product's operand
  // glu: the second product's bias (N) and the clamped form's constants (GPT-OSS).
  const float* bias2 = nullptr;
  bool clamped = false;
  float alpha = 1.702f, limit = 7.0f;
};

// C (M, N) = op(A) · op(B) + beta·C, row-major, op(A) (M, K), op(B) (K, N). With Ab and Bb
// set instead of A and B, the operands are bf16 (no transposes, beta 0 or 1; common/gemm.hpp
// gemm_bf16_serial) and the product accumulates in fp32. With Ab and Bp, B is a packed bf16
// weight matrix (common/gemm_bf16_packed.hpp; ldb unused).
// A pair (the gated experts' W1 and W3, epilogue glu): C2 = op(A) · B2 (or Bp2) as well, tile
// by tile, so that the epilogue finds both tiles of a product pair still in cache and writes
// the hidden activations in one pass (the Qwen3-30B-A3B shape: 32 rows × 768 columns per
// expert, two 96 KiB tiles).
struct GemmProblem {
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  const float* A = nullptr;
  int64_t lda = 0;
  const float* B = nullptr;
  int64_t ldb = 0;
  const uint16_t* Ab = nullptr;
  const uint16_t* Bb = nullptr;
  const uint16_t* Bp = nullptr;
  float beta = 0.0f;
  float* C = nullptr;
  int64_t ldc = 0;
  const float* B2 = nullptr;      // pair: fp32 second weight, like B
  const uint16_t* Bp2 = nullptr;  // pair: packed bf16 second weight, like Bp
  float* C2 = nullptr;            // pair: the second product, like C
  TileEpilogue epi;
};

// Reusable: the problem and tile lists keep their storage across calls.
class GroupedGemm {
 public:
  void clear() { problems_.clear(); }
  void add(const GemmProblem& p) {
    if (p.M > 0 && p.N > 0) problems_.push_back(p);
  }
  void run();  // runs the products and their epilogues, and clears the list

 private:
  void plan();  // tiles_ from problems_
  struct Tile {
    int32_t problem;
    int64_t m0, m, n0, n;
  };
  std::vector<GemmProblem> problems_;
  std::vector<Tile> tiles_;
};

}  // namespace moe::detail
