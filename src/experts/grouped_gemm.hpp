// Many independent GEMMs (one per expert) run as one parallel loop over fixed-size output
// tiles. Each tile is one serial call of its kernel (below) over the full reduction
// dimension, and the tiling depends only on the shapes, never on the thread count: the
// results are bit-identical for any OMP_NUM_THREADS (the same argument as common/gemm.hpp).
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
  // Each step's result rounded to bf16, as a bf16 torch module computes (MoEConfig's
  // round_each_op): the product, the bias added, the activation, and each op of the glu.
  bool round_steps = false;
};

// The kernels a grouped product runs: each a type that owns the layout of its weights, says
// its name and runs one tile (STYLE 15). GroupedGemm asks the problem's kernel; it never
// branches on which operand pointers are set.
//
// KernelF32: fp32 operands as stored, A (M, K) and B (K, N) row-major or read transposed,
// any beta; a tile is one serial oneDNN sgemm (common/gemm.hpp).
struct KernelF32 {
  struct A {
    const float* p = nullptr;
    int64_t ld = 0;
    bool trans = false;  // A is stored (K, M): op(A) = Aᵀ
  };
  struct B {
    const float* p = nullptr;
    int64_t ld = 0;
    bool trans = false;  // B is stored (N, K)
  };
  static constexpr int64_t kTileM = 1024, kTileN = 1024;  // grouped_gemm.cpp says why
  static const char* name();
};

// KernelBf16Packed: bf16 rows against a weight matrix packed once (common/gemm_bf16_packed.hpp:
// panels of 64 columns, rows in pairs, K padded to 32); beta 0 or 1; fp32 accumulation. The
// packed bytes feed every kernel of the level (AMX tiles, vdpbf16ps, or widened to fp32).
struct KernelBf16Packed {
  struct A {
    const uint16_t* p = nullptr;
    int64_t ld = 0;
  };
  using B = const uint16_t*;  // one packed (K, N) matrix
  static constexpr int64_t kTileM = 512, kTileN = 2048;  // tiles start on a panel
  static int64_t weight_size(int64_t K, int64_t N);      // values of one packed matrix
  static const char* name();
};

// C (M, N) = op(A) · op(B) + beta·C on kernel K, then the epilogue on each tile.
// A pair (the gated experts' W1 and W3, epilogue glu): C2 = op(A) · B2 as well, tile by tile,
// so that the epilogue finds both tiles of a product pair still in cache and writes the
// hidden activations in one pass (the Qwen3-30B-A3B shape: 32 rows × 768 columns per expert,
// two 96 KiB tiles).
template <class Kernel>
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  typename Kernel::A a;
  typename Kernel::B b{};
  typename Kernel::B b2{};  // glu: the pair's second weight
  float beta = 0.0f;
  float* C = nullptr;
  float* C2 = nullptr;  // glu: the pair's second product, like C
  int64_t ldc = 0;
  TileEpilogue epi;
};

// Reusable: the problem and tile lists keep their storage across calls.
class GroupedGemm {
 public:
  void add(const GemmProblem<KernelF32>& p) {
    if (p.M > 0 && p.N > 0) f32_.problems.push_back(p);
  }
  void add(const GemmProblem<KernelBf16Packed>& p) {
    if (p.M > 0 && p.N > 0) bf16_.problems.push_back(p);
  }
  void run();  // runs the products and their epilogues, and clears the lists

 private:
  struct Tile {
    int32_t problem;
    int64_t m0, m, n0, n;
  };
  template <class Kernel>
  struct List {
    std::vector<GemmProblem<Kernel>> problems;
    std::vector<Tile> tiles;
    void run();
  };
  List<KernelF32> f32_;
  List<KernelBf16Packed> bf16_;
};

}  // namespace moe::detail
