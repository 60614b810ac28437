// Stacked experts (SPEC §4) run over dispatched rows: rows [offsets[e], offsets[e+1]) of every
// (R, ·) buffer belong to expert e, and each expert is one GEMM per weight over only its rows.
// Experts without rows are never touched. Derivations: docs/math.md §experts.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/aligned.hpp"
#include "common/huge_pages.hpp"
#include "common/parallel.hpp"
#include "experts/grouped_gemm.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

// The kinds with a second input product a3 = x·W3 (+ b3).
inline bool gated_kind(ExpertKind k) {
  return k == ExpertKind::swiglu || k == ExpertKind::clamped_swiglu;
}

struct ExpertShape {
  ExpertKind kind = ExpertKind::mlp;
  Activation act = Activation::relu;
  int64_t E = 0, d = 0, F = 0, Do = 0;  // F: hidden width (mlp, swiglu, clamped_swiglu)
  float alpha = 1.702f, limit = 7.0f;   // clamped_swiglu
  bool round_steps = false;             // round_each_op (bf16): each step's result to bf16
  static ExpertShape of(const MoEConfig& cfg) {
    return {cfg.expert,        cfg.expert == ExpertKind::mlp ? cfg.activation : Activation::relu,
            cfg.n_experts,     cfg.d_model,
            cfg.hidden(),      cfg.out_dim(),
            cfg.swiglu_alpha,  cfg.swiglu_limit,
            cfg.round_each_op};
  }
};

// Stacked weights: linear_relu W1 (E, d, Do), b1 (E, Do); mlp W1 (E, d, F), b1 (E, F),
// W2 (E, F, Do), b2 (E, Do); swiglu W1 (E, d, F), W2 (E, F, Do), W3 (E, d, F); clamped_swiglu
// those of swiglu and b1 (E, F), b2 (E, Do), b3 (E, F). Biases may be null.
struct ExpertWeights {
  const float *W1 = nullptr, *b1 = nullptr, *W2 = nullptr, *b2 = nullptr, *W3 = nullptr,
              *b3 = nullptr;
};
struct ExpertGrads {  // same shapes, accumulated (+=)
  float *dW1 = nullptr, *db1 = nullptr, *dW2 = nullptr, *db2 = nullptr, *dW3 = nullptr,
        *db3 = nullptr;
};

// Activations saved by forward for backward, (R, ·) each.
struct ExpertActs {
  float* a1 = nullptr;   // (R, F) x·W1 + b1 (mlp, swiglu, clamped_swiglu)
  float* a3 = nullptr;   // (R, F) x·W3 (+ b3) (swiglu, clamped_swiglu)
  float* hid = nullptr;  // (R, F) act(a1) (mlp), silu(a1)⊙a3 (swiglu) or
                         // clamped_swiglu(a1, a3)
  float* out = nullptr;  // (R, Do) expert output
};

// Scratch of backward, (R, ·) each.
struct ExpertScratch {
  float* dh = nullptr;   // (R, F) mlp, swiglu, clamped_swiglu
  float* da3 = nullptr;  // (R, F) swiglu, clamped_swiglu
};

// precision "bf16" (SPEC §6): bf16 copies of the fp32 master weights, each expert's matrix
// packed for gemm_bf16_packed_serial (common/gemm_bf16_packed.hpp: panels of 64 columns, rows
// in pairs, oneDNN's BA16a64b2a), so that no product packs a weight again: the masters'
// (K, N) for forward, and their transposes (N, K) for backward's dx products. They are made
// from the masters when stale: the owner calls invalidate() whenever the masters may have
// changed (after a backward, on parameter access, on load), and the next forward or backward
// makes again the copies it needs. Nothing is repacked while the masters stay the same.
// A vector whose new elements are left uninitialised (default-initialised): the packed stacks
// are written whole by their packing before anything reads them, and zero-filling gigabytes
// of them first costs as much as the packing (a loader's page faults and a memset). Large
// stacks live on huge pages (common/huge_pages.hpp).
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n * sizeof(T) < kHugeAllocMin) return std::allocator<T>::allocate(n);
    return static_cast<T*>(huge_alloc(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept {
    if (n * sizeof(T) < kHugeAllocMin) return std::allocator<T>::deallocate(p, n);
    huge_free(p, n * sizeof(T));
  }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
using PackedStack = std::vector<uint16_t, UninitAllocator<uint16_t>>;

struct ExpertWeightsBf16 {
  // Expert e's matrix starts at e·packed_bf16_size(K, N) for (K, N): W1 (d, ·), W2 (F, Do),
  // W3 (d, F); W1t (·, d), W2t (Do, F), W3t (F, d).
  PackedStack W1, W2, W3;
  PackedStack W1t, W2t, W3t;
  bool forward_ready = false, backward_ready = false;
  // The copies are the weights (a layer without fp32 masters, LayerOptions): never made again
  // from masters, never invalidated; assign() writes them.
  bool fixed = false;

  void invalidate() {
    if (!fixed) forward_ready = backward_ready = false;
  }
  // Forward copies for s, marked fixed and ready: the layer holds no masters. Zeroed, or with
  // zero = false left unwritten for a caller that assigns every expert matrix (a loader).
  void hold_only(const ExpertShape& s, bool zero = true);
  // Expert e's matrix (1: W1, 2: W2, 3: W3) from src, fp32 in the masters' per-expert layout
  // ((d, ·), (F, Do), (d, F)), rounded to bf16 and packed into the forward copy. The copies'
  // layout is this struct's business: writers outside go through here.
  void assign(int matrix, int64_t e, const float* src, const ExpertShape& s);
  // The same from bf16 values, element (i, o) of the matrix at src[i·s_in + o·s_out]: a
  // checkpoint's bf16 bytes packed as they are, in whatever layout the file has them.
  void assign_bf16(int matrix, int64_t e, const uint16_t* src, int64_t s_in, int64_t s_out,
                   const ExpertShape& s);
  void prepare_forward(const ExpertWeights& w, const ExpertShape& s);
  void prepare_backward(const ExpertWeights& w, const ExpertShape& s);
  // Expert e's slot of a stack of packed (K, N) matrices (sized for E of them) = bf16 of the
  // row-major (K, N) src, or of the transpose of the row-major (N, K) src when transposed.
  static void pack_expert(PackedStack& stack, int64_t e, const float* src, int64_t K,
                          int64_t N, bool transposed = false);
};

// The operands of the bf16 products, rounded to bf16 as they enter them: rows (R, ·) each,
// for the weight gradients the rows of each expert transposed, (·, n_e) at row offset
// off[e]·width, and the upstream gradients (dout, dh, da3) packed per expert as the B of
// the weight gradients (packed_off: each expert's start). Grows, never shrinks.
// On 64-byte lines (AlignedAllocator): the packed gradients are B operands, loaded 64 bytes at a
// time (16 bytes off a line, as malloc leaves buffers from 128 KiB on, each load spans two).
struct ExpertScratchBf16 {
  using Buffer = AlignedScratch<uint16_t>;
  Buffer xg, hid, dout, dh, da3, xgT, hidT;
  Buffer packed[3];
  std::vector<int64_t> packed_off[3];
};

class ExpertPrecision;  // experts/precision.hpp

// acts.out is assigned from xg (R, d). prec (experts/precision.hpp) holds the stack's
// precision state; null or fp32: the masters' fp32 products. int8 (evaluation only): the int8
// products of experts/int8.hpp (acts.a1, a3, hid hold fp32 values). bf16: every product takes
// bf16 operands and accumulates in fp32 (biases, activations and everything else stay fp32);
// acts.hid is then not written (the bf16 hidden activations live in prec's scratch, for
// backward).
void experts_forward(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                     const int64_t* offsets, const ExpertShape& s, GroupedGemm& gg,
                     ExpertPrecision* prec = nullptr);

// dxg (R, d) is assigned; dout (R, Do) is the gradient of acts.out and is used as scratch
// (overwritten). Parameter gradients accumulate. prec must be what the forward had (fp32 or
// bf16): the same products in both, on their operands (one code path, experts.cpp).
void experts_backward(float* dxg, ExpertGrads& g, float* dout, ExpertScratch& scr,
                      const ExpertActs& acts, const float* xg, const ExpertWeights& w,
                      const int64_t* offsets, const ExpertShape& s, GroupedGemm& gg,
                      ExpertPrecision* prec = nullptr);

}  // namespace moe::detail
