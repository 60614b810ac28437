#include "experts/experts.hpp"

#include <algorithm>
#include <type_traits>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/activation.hpp"
#include "experts/int8.hpp"
#include "experts/precision.hpp"

namespace moe::detail {

namespace {

// The kernel of the products on operands of type T: fp32 or packed bf16.
template <typename T>
using KernelOf = std::conditional_t<std::is_same_v<T, uint16_t>, KernelBf16Packed, KernelF32>;

// Expert e's weight matrix of a stack: fp32 stacked (E, K, N), or (E, N, K) read transposed
// when trans_b; bf16: a stack of packed (K, N) matrices (ExpertWeightsBf16).
KernelF32::B weight_of(const float* W, int64_t e, int64_t K, int64_t N, bool trans_b) {
  return {W + e * K * N, trans_b ? K : N, trans_b};
}
KernelBf16Packed::B weight_of(const uint16_t* W, int64_t e, int64_t K, int64_t N, bool) {
  return W + e * KernelBf16Packed::weight_size(K, N);
}

// C rows of expert e (n_e, N) = A rows (n_e, K) · op(B_e) + beta·C, for every expert with
// rows, then epi on them. epi's bias is stacked (E, N) and its outputs are (R, N) like C, all
// offset per expert here. With B2 and C2 (a pair, epi glu): C2 rows = A rows · B2_e as well,
// stacked like B.
template <typename T>
void add_rowwise(GroupedGemm& gg, float* C, int64_t ldc, const T* A, int64_t lda, const T* B,
                 bool trans_b, int64_t N, int64_t K, float beta, const int64_t* off, int64_t E,
                 const TileEpilogue& epi = {}, const T* B2 = nullptr, float* C2 = nullptr) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    GemmProblem<KernelOf<T>> p;
    p.M = n;
    p.N = N;
    p.K = K;
    p.a.p = A + off[e] * lda;
    p.a.ld = lda;
    p.b = weight_of(B, e, K, N, trans_b);
    if (B2) {
      p.b2 = weight_of(B2, e, K, N, trans_b);
      p.C2 = C2 + off[e] * ldc;
    }
    p.beta = beta;
    p.C = C + off[e] * ldc;
    p.ldc = ldc;
    p.epi = epi;
    if (epi.bias) p.epi.bias = epi.bias + e * N;
    if (epi.bias2) p.epi.bias2 = epi.bias2 + e * N;
    if (epi.out) p.epi.out = epi.out + off[e] * ldc;
    if (epi.out_bf16) p.epi.out_bf16 = epi.out_bf16 + off[e] * ldc;
    gg.add(p);
  }
}

// dW_e (M, N) += A rowsᵀ (M, n_e) · D rows (n_e, N) for every expert with rows: the
// reduction runs over the expert's rows, in one GEMM, never token by token. fp32: A (R, M)
// and D (R, N) rows, A read transposed. bf16: A holds each expert's rows already transposed
// (transpose_per_expert), (M, n_e) at A + off[e]·M with row stride n_e, and D each expert's
// rows packed as a (n_e, N) weight matrix (pack_per_expert) at D + poff[e]: the packed
// kernels (AMX where present) run the weight gradients too.
void add_weight_grad(GroupedGemm& gg, float* dW, const float* A, int64_t M, const float* D,
                     int64_t N, const int64_t* off, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    GemmProblem<KernelF32> p;
    p.M = M;
    p.N = N;
    p.K = n;
    p.a = {A + off[e] * M, M, true};
    p.b = {D + off[e] * N, N, false};
    p.beta = 1.0f;
    p.C = dW + e * M * N;
    p.ldc = N;
    gg.add(p);
  }
}
void add_weight_grad(GroupedGemm& gg, float* dW, const uint16_t* AT, int64_t M,
                     const uint16_t* Dp, const std::vector<int64_t>& poff, int64_t N,
                     const int64_t* off, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    GemmProblem<KernelBf16Packed> p;
    p.M = M;
    p.N = N;
    p.K = n;
    p.a = {AT + off[e] * M, n};
    p.b = Dp + poff[e];
    p.beta = 1.0f;
    p.C = dW + e * M * N;
    p.ldc = N;
    gg.add(p);
  }
}

// db_e (N) += Σ over the expert's rows of D (·, N), rows summed in order.
void add_bias_grad(float* db, const float* D, int64_t N, const int64_t* off, int64_t E) {
  constexpr int64_t kCols = 256;
  const int64_t nb = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(dynamic, 1) if (off[E] * N >= kParallelMin)
  for (int64_t task = 0; task < E * nb; ++task) {
    const int64_t e = task / nb, c0 = (task % nb) * kCols, c1 = std::min(N, c0 + kCols);
    float* out = db + e * N;
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t c = c0; c < c1; ++c) out[c] += D[r * N + c];
  }
}

// AT gets each expert's rows of A (R, cols) transposed (see add_weight_grad_bf16), rounded
// to bf16 when A is fp32. Tasks of (expert, 256 columns).
template <typename Src>
void transpose_per_expert(uint16_t* AT, const Src* A, int64_t cols, const int64_t* off,
                          int64_t E) {
  constexpr int64_t kCols = 256;
  const int64_t nb = (cols + kCols - 1) / kCols;
#pragma omp parallel for schedule(dynamic, 1) if (off[E] * cols >= kParallelMin)
  for (int64_t task = 0; task < E * nb; ++task) {
    const int64_t e = task / nb, c0 = (task % nb) * kCols, c1 = std::min(cols, c0 + kCols);
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    uint16_t* dst = AT + off[e] * cols + c0 * n;
    const Src* src = A + off[e] * cols + c0;
    if constexpr (std::is_same_v<Src, float>)
      to_bf16_transposed(dst, n, src, cols, n, c1 - c0);
    else
      transpose_bf16(dst, n, src, cols, n, c1 - c0);
  }
}

// Wp = the E experts' matrices of W packed: (K, N) from the row-major (E, K, N) W, or when
// transposed the (N, K) transposes of them. One task per expert.
void pack_stack(PackedStack& Wp, const float* W, int64_t E, int64_t K, int64_t N,
                bool transposed) {
  const int64_t rows = transposed ? N : K, cols = transposed ? K : N;
  Wp.resize(static_cast<size_t>(E * packed_bf16_size(rows, cols)));
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e)
    ExpertWeightsBf16::pack_expert(Wp, e, W + e * K * N, rows, cols, transposed);
}

// A float as a product operand of type T: itself, or rounded to bf16.
template <typename T>
inline T as_operand(float v) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return to_bf16(v);
  else
    return v;
}

template <typename T, typename A>
T* grown(std::vector<T, A>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// The forward's products on operands of type T: float (fp32) or uint16_t (bf16 values). x is
// (R, d); W1, W2, W3 are stacked like the masters; hid (R, F) receives the hidden activations
// in T, the second product's operand (and backward's). Biases and activations are fp32.
template <typename T>
void forward_products(ExpertActs& acts, const T* x, const T* W1, const T* W2, const T* W3,
                      T* hid, const ExpertWeights& w, const int64_t* off, const ExpertShape& s,
                      GroupedGemm& gg) {
  using Op = TileEpilogue::Op;
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const bool rounded = bf16 && s.round_steps;  // round_each_op (validate(): bf16 only)
  const int64_t E = s.E, d = s.d, F = s.F, Do = s.Do;
  switch (s.kind) {
    case ExpertKind::linear_relu: {
      TileEpilogue epi;  // out = relu(x·W1 + b1)
      epi.op = Op::bias_act_inplace;
      epi.act = Activation::relu;
      epi.bias = w.b1;
      epi.round_steps = rounded;
      add_rowwise(gg, acts.out, Do, x, d, W1, false, Do, d, 0.0f, off, E, epi);
      gg.run();
      break;
    }
    case ExpertKind::mlp: {
      TileEpilogue epi1;  // a1 = x·W1 + b1, hid = act(a1) (rounded to bf16 in bf16)
      epi1.op = Op::bias_act;
      epi1.act = s.act;
      epi1.bias = w.b1;
      epi1.round_steps = rounded;
      if constexpr (bf16)
        epi1.out_bf16 = hid;
      else
        epi1.out = hid;
      add_rowwise(gg, acts.a1, F, x, d, W1, false, F, d, 0.0f, off, E, epi1);
      gg.run();
      TileEpilogue epi2;  // out = hid·W2 + b2
      epi2.op = Op::bias;
      epi2.bias = w.b2;
      epi2.round_steps = rounded;
      add_rowwise(gg, acts.out, Do, static_cast<const T*>(hid), F, W2, false, Do, F, 0.0f, off,
                  E, epi2);
      gg.run();
      break;
    }
    case ExpertKind::swiglu:
    case ExpertKind::clamped_swiglu: {
      // a1 = x·W1 (+ b1) and a3 = x·W3 (+ b3) as a pair, tile by tile, and hid from both
      // tiles in the pair's epilogue (rounded to bf16 in bf16). clamped_swiglu adds its
      // biases b1, b3 and b2 in the products' epilogues.
      const bool clamped = s.kind == ExpertKind::clamped_swiglu;
      TileEpilogue glu, e2;
      glu.op = Op::glu;
      glu.clamped = clamped;
      glu.alpha = s.alpha;
      glu.limit = s.limit;
      glu.round_steps = e2.round_steps = rounded;
      if constexpr (bf16)
        glu.out_bf16 = hid;
      else
        glu.out = hid;
      if (clamped) {
        glu.bias = w.b1;
        glu.bias2 = w.b3;
        e2.op = Op::bias;
        e2.bias = w.b2;
      }
      add_rowwise(gg, acts.a1, F, x, d, W1, false, F, d, 0.0f, off, E, glu, W3, acts.a3);
      gg.run();
      add_rowwise(gg, acts.out, Do, static_cast<const T*>(hid), F, W2, false, Do, F, 0.0f, off,
                  E, e2);
      gg.run();
      break;
    }
  }
}

// Each expert's rows of D (R, N) rounded to bf16 and packed as a (n_e, N) weight matrix,
// expert e's at Dp + poff[e]: the B operand of its weight gradient. One task per expert.
void pack_per_expert(ExpertScratchBf16::Buffer& Dp, std::vector<int64_t>& poff, const float* D,
                     int64_t N, const int64_t* off, int64_t E) {
  poff.assign(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    poff[e + 1] = poff[e] + (n > 0 ? packed_bf16_size(n, N) : 0);
  }
  uint16_t* dst = grown(Dp, poff[E]);
#pragma omp parallel for schedule(dynamic, 1) if (off[E] * N >= kParallelMin)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n > 0) pack_bf16(dst + poff[e], D + off[e] * N, N, 1, n, N);
  }
}

// The backward's upstream operands: dout (the output's gradient), dh and da3 (the hidden
// pre-activations' gradients), each (R, width) in fp32 when computed.
enum Upstream { kDout = 0, kDh = 1, kDa3 = 2 };

// The operands of the backward's products in fp32: the upstream values as they are, the
// forward's saved x and hidden rows, the masters read transposed for dx.
struct Fp32Operands {
  const ExpertWeights& w;
  const ExpertShape& s;
  const float* x;    // (R, d)
  const float* hid;  // (R, F)
  const int64_t* off;
  const float* D[3] = {};
  int64_t N[3] = {};
  void take(Upstream u, const float* v, int64_t n) {
    D[u] = v;
    N[u] = n;
  }
  // dW += (x or hid)ᵀ · upstream u, per expert.
  void weight_grad(GroupedGemm& gg, float* dW, bool of_x, Upstream u) {
    add_weight_grad(gg, dW, of_x ? x : hid, of_x ? s.d : s.F, D[u], N[u], off, s.E);
  }
  // C (R, width of matrix's input) = upstream u · W_matrixᵀ (+ C with beta 1), per expert.
  void dx(GroupedGemm& gg, float* C, Upstream u, int matrix, float beta) {
    const float* W = matrix == 1 ? w.W1 : matrix == 2 ? w.W2 : w.W3;
    const int64_t K = matrix == 2 ? s.F : s.d;
    add_rowwise(gg, C, K, D[u], N[u], W, true, K, N[u], beta, off, s.E);
  }
};

// The same in bf16: each upstream rounded once into the scratch (the dx products' rows)
// and packed per expert (the weight gradients' B), x and hidden rows transposed per expert
// (the weight gradients' A), the packed transposed copies of the weights for dx.
struct Bf16Operands {
  ExpertWeightsBf16& wb;
  ExpertScratchBf16& sb;
  const ExpertShape& s;
  const uint16_t* xT;  // per expert (d, n_e)
  const uint16_t* hT;  // per expert (F, n_e)
  const int64_t* off;
  const uint16_t* D[3] = {};
  int64_t N[3] = {};
  void take(Upstream u, const float* v, int64_t n) {
    ExpertScratchBf16::Buffer& rows = u == kDout ? sb.dout : u == kDh ? sb.dh : sb.da3;
    const int64_t R = off[s.E];
    uint16_t* dst = grown(rows, R * n);
    to_bf16_n(dst, v, R * n);
    D[u] = dst;
    N[u] = n;
    pack_per_expert(sb.packed[u], sb.packed_off[u], v, n, off, s.E);
  }
  void weight_grad(GroupedGemm& gg, float* dW, bool of_x, Upstream u) {
    add_weight_grad(gg, dW, of_x ? xT : hT, of_x ? s.d : s.F, sb.packed[u].data(),
                    sb.packed_off[u], N[u], off, s.E);
  }
  void dx(GroupedGemm& gg, float* C, Upstream u, int matrix, float beta) {
    const PackedStack& Wt = matrix == 1 ? wb.W1t : matrix == 2 ? wb.W2t : wb.W3t;
    const int64_t K = matrix == 2 ? s.F : s.d;
    add_rowwise(gg, C, K, D[u], N[u], Wt.data(), false, K, N[u], beta, off, s.E);
  }
};

// The experts' backward on either precision's operands (docs/math.md §experts): the
// elementwise passes and bias gradients in fp32, the products through ops.
template <class Ops>
void backward_products(float* dxg, ExpertGrads& g, float* dout, ExpertScratch& scr,
                       const ExpertActs& acts, const int64_t* off, const ExpertShape& s,
                       GroupedGemm& gg, Ops& ops) {
  const int64_t E = s.E, F = s.F, Do = s.Do, R = off[E];
  if (s.kind == ExpertKind::linear_relu) {
    // da = dout ⊙ 1[out > 0]: out = relu(a), so out > 0 exactly where a > 0.
    const float* out = acts.out;
#pragma omp parallel for schedule(static) if (R * Do >= kParallelMin)
    for (int64_t i = 0; i < R * Do; ++i)
      if (!(out[i] > 0.0f)) dout[i] = 0.0f;
    if (g.db1) add_bias_grad(g.db1, dout, Do, off, E);
    ops.take(kDout, dout, Do);
    ops.weight_grad(gg, g.dW1, true, kDout);
    ops.dx(gg, dxg, kDout, 1, 0.0f);
    gg.run();
    return;
  }
  const bool glu = gated_kind(s.kind), clamped = s.kind == ExpertKind::clamped_swiglu;
  if (g.db2) add_bias_grad(g.db2, dout, Do, off, E);
  ops.take(kDout, dout, Do);
  ops.weight_grad(gg, g.dW2, false, kDout);
  ops.dx(gg, scr.dh, kDout, 2, 0.0f);
  gg.run();
  // dh becomes da1 in place, da3 beside it. A separate pass: fused into the dh tiles'
  // epilogue it measured 1–2% slower (B1).
  float *dh = scr.dh, *da3 = scr.da3;
  const float* a1 = acts.a1;
  if (clamped) {
    const float* a3 = acts.a3;
    const float alpha = s.alpha, limit = s.limit;
#pragma omp parallel for simd schedule(static) if (R * F >= kParallelMin)
    for (int64_t i = 0; i < R * F; ++i) {
      float d1, d3;
      clamped_swiglu_grad_f32(&d1, &d3, a1[i], a3[i], alpha, limit);
      da3[i] = dh[i] * d3;
      dh[i] *= d1;
    }
  } else if (glu) {
    const float* a3 = acts.a3;
#pragma omp parallel for simd schedule(static) if (R * F >= kParallelMin)
    for (int64_t i = 0; i < R * F; ++i) {
      da3[i] = dh[i] * silu_f32(a1[i]);
      dh[i] *= a3[i] * silu_grad_f32(a1[i]);
    }
  } else {
#pragma omp parallel for schedule(static) if (R * F >= kParallelMin)
    for (int64_t i = 0; i < R * F; ++i) dh[i] *= act_grad(s.act, a1[i]);
  }
  if (g.db1) add_bias_grad(g.db1, dh, F, off, E);
  if (g.db3) add_bias_grad(g.db3, da3, F, off, E);
  ops.take(kDh, dh, F);
  ops.weight_grad(gg, g.dW1, true, kDh);
  if (glu) {
    ops.take(kDa3, da3, F);
    ops.weight_grad(gg, g.dW3, true, kDa3);
  }
  ops.dx(gg, dxg, kDh, 1, 0.0f);
  gg.run();
  if (glu) {
    ops.dx(gg, dxg, kDa3, 3, 1.0f);
    gg.run();
  }
}
}  // namespace

void ExpertWeightsBf16::pack_expert(PackedStack& stack, int64_t e, const float* src,
                                    int64_t K, int64_t N, bool transposed) {
  const int64_t size = packed_bf16_size(K, N);
  MOE_ASSERT(static_cast<int64_t>(stack.size()) >= (e + 1) * size);
  pack_bf16(stack.data() + e * size, src, transposed ? 1 : N, transposed ? K : 1, K, N);
}

void ExpertWeightsBf16::prepare_forward(const ExpertWeights& w, const ExpertShape& s) {
  if (forward_ready) return;
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  pack_stack(W1, w.W1, s.E, s.d, mid, false);
  if (w.W2) pack_stack(W2, w.W2, s.E, s.F, s.Do, false);
  if (w.W3) pack_stack(W3, w.W3, s.E, s.d, s.F, false);
  forward_ready = true;
}

void ExpertWeightsBf16::hold_only(const ExpertShape& s, bool zero) {
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  const auto hold = [zero](PackedStack& W, int64_t n) {
    W.clear();
    if (zero)
      W.assign(static_cast<size_t>(n), 0);
    else
      W.resize(static_cast<size_t>(n));  // uninitialised: every byte is assigned later
  };
  hold(W1, s.E * packed_bf16_size(s.d, mid));
  if (s.kind != ExpertKind::linear_relu) hold(W2, s.E * packed_bf16_size(s.F, s.Do));
  // W3: the gated kinds (swiglu, clamped_swiglu).
  if (s.kind != ExpertKind::linear_relu && s.kind != ExpertKind::mlp)
    hold(W3, s.E * packed_bf16_size(s.d, s.F));
  W1t.clear();
  W2t.clear();
  W3t.clear();
  fixed = forward_ready = true;
  backward_ready = false;
}

void ExpertWeightsBf16::assign(int matrix, int64_t e, const float* src, const ExpertShape& s) {
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  const int64_t K = matrix == 1 ? s.d : matrix == 2 ? s.F : s.d;
  const int64_t N = matrix == 1 ? mid : matrix == 2 ? s.Do : s.F;
  MOE_ASSERT(e >= 0 && e < s.E);
  pack_expert(matrix == 1 ? W1 : matrix == 2 ? W2 : W3, e, src, K, N);
}

void ExpertWeightsBf16::assign_bf16(int matrix, int64_t e, const uint16_t* src, int64_t s_in,
                                    int64_t s_out, const ExpertShape& s) {
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  const int64_t K = matrix == 1 ? s.d : matrix == 2 ? s.F : s.d;
  const int64_t N = matrix == 1 ? mid : matrix == 2 ? s.Do : s.F;
  PackedStack& W = matrix == 1 ? W1 : matrix == 2 ? W2 : W3;
  const int64_t size = packed_bf16_size(K, N);
  MOE_ASSERT(e >= 0 && e < s.E && static_cast<int64_t>(W.size()) >= (e + 1) * size);
  pack_bf16(W.data() + e * size, src, s_in, s_out, K, N);
}

void ExpertWeightsBf16::prepare_backward(const ExpertWeights& w, const ExpertShape& s) {
  if (backward_ready) return;
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  pack_stack(W1t, w.W1, s.E, s.d, mid, true);
  if (w.W2) pack_stack(W2t, w.W2, s.E, s.F, s.Do, true);
  if (w.W3) pack_stack(W3t, w.W3, s.E, s.d, s.F, true);
  backward_ready = true;
}

void experts_forward(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                     const int64_t* off, const ExpertShape& s, GroupedGemm& gg,
                     ExpertPrecision* prec) {
  const int64_t d = s.d, F = s.F, R = off[s.E];
  if (R == 0) return;
  if (prec && prec->is_int8())
    return experts_forward_int8(acts, xg, w, off, s, prec->int8, prec->int8_ops);
  if (prec && prec->is_low_bit())
    return experts_forward_quant(acts, xg, w, off, s, prec->quant, prec->quant_ops);
  if (!prec || !prec->is_bf16())
    return forward_products(acts, xg, w.W1, w.W2, w.W3, acts.hid, w, off, s, gg);
  // bf16: the weights' copies (made again if the masters changed) and the rows rounded.
  ExpertWeightsBf16& wb = prec->bf16;
  ExpertScratchBf16& sb = prec->bf16_ops;
  wb.prepare_forward(w, s);
  uint16_t* x = grown(sb.xg, R * d);
  to_bf16_rows(x, d, xg, d, R, d);
  uint16_t* hid = s.kind == ExpertKind::linear_relu ? nullptr : grown(sb.hid, R * F);
  forward_products<uint16_t>(acts, x, wb.W1.data(), wb.W2.data(), wb.W3.data(), hid, w, off, s,
                             gg);
}

void experts_backward(float* dxg, ExpertGrads& g, float* dout, ExpertScratch& scr,
                      const ExpertActs& acts, const float* xg, const ExpertWeights& w,
                      const int64_t* off, const ExpertShape& s, GroupedGemm& gg,
                      ExpertPrecision* prec) {
  const int64_t E = s.E, R = off[E];
  if (R == 0) return;
  if (!prec || !prec->is_bf16()) {
    Fp32Operands ops{w, s, xg, acts.hid, off};
    return backward_products(dxg, g, dout, scr, acts, off, s, gg, ops);
  }
  ExpertWeightsBf16& wb = prec->bf16;
  ExpertScratchBf16& sb = prec->bf16_ops;
  wb.prepare_backward(w, s);
  uint16_t* xT = grown(sb.xgT, R * s.d);
  transpose_per_expert(xT, xg, s.d, off, E);
  uint16_t* hT = nullptr;
  if (s.kind != ExpertKind::linear_relu) {
    hT = grown(sb.hidT, R * s.F);
    transpose_per_expert(hT, sb.hid.data(), s.F, off, E);
  }
  Bf16Operands ops{wb, sb, s, xT, hT, off};
  backward_products(dxg, g, dout, scr, acts, off, s, gg, ops);
}

}  // namespace moe::detail
