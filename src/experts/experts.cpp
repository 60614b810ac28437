#include "experts/experts.hpp"

#include <algorithm>

#include "common/check.hpp"
#include "experts/activation.hpp"

namespace moe::detail {

namespace {

// C rows of expert e (n_e, N) = A rows (n_e, K) · op(B_e) + beta·C, for every expert with
// rows, then epi on them. B is stacked (E, K, N), or (E, N, K) read transposed when trans_b;
// epi's bias is stacked (E, N) and its out is (R, N) like C, both offset per expert here.
void add_rowwise(GroupedGemm& gg, float* C, int64_t ldc, const float* A, int64_t lda,
                 const float* B, bool trans_b, int64_t N, int64_t K, float beta,
                 const int64_t* off, int64_t E, const TileEpilogue& epi = {}) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    GemmProblem p;
    p.trans_b = trans_b;
    p.M = n;
    p.N = N;
    p.K = K;
    p.A = A + off[e] * lda;
    p.lda = lda;
    p.B = B + e * K * N;
    p.ldb = trans_b ? K : N;
    p.beta = beta;
    p.C = C + off[e] * ldc;
    p.ldc = ldc;
    p.epi = epi;
    if (epi.bias) p.epi.bias = epi.bias + e * N;
    if (epi.out) p.epi.out = epi.out + off[e] * ldc;
    gg.add(p);
  }
}

// dW_e (M, N) += A rowsᵀ (M, n_e) · D rows (n_e, N) for every expert with rows: the
// reduction runs over the expert's rows, in one GEMM, never token by token.
void add_weight_grad(GroupedGemm& gg, float* dW, const float* A, int64_t M, const float* D,
                     int64_t N, const int64_t* off, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    GemmProblem p;
    p.trans_a = true;
    p.M = M;
    p.N = N;
    p.K = n;
    p.A = A + off[e] * M;
    p.lda = M;
    p.B = D + off[e] * N;
    p.ldb = N;
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

}  // namespace

void experts_forward(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                     const int64_t* off, const ExpertShape& s, GroupedGemm& gg,
                     const ExpertWeightsBf16* wb) {
  using Op = TileEpilogue::Op;
  const int64_t E = s.E, d = s.d, F = s.F, Do = s.Do, R = off[E];
  if (R == 0) return;
  // C = A·W per expert, then epi: queued on gg (fp32: each tile's epilogue runs right after
  // its product, at gg.run()) or computed now in bf16 with the epilogues applied after it.
  auto product = [&](float* C, int64_t ldc, const float* A, int64_t lda, const float* W,
                     const PackedBf16* Wb, int64_t N, int64_t K, const TileEpilogue& epi) {
    add_rowwise(gg, C, ldc, A, lda, W, false, N, K, 0.0f, off, E, epi);
    if (Wb) {
      grouped_gemm_bf16(C, ldc, A, lda, *Wb, off);
      gg.run_epilogues();
    }
  };
  const PackedBf16* b1 = wb ? wb->W1 : nullptr;
  const PackedBf16* b2 = wb ? wb->W2 : nullptr;
  const PackedBf16* b3 = wb ? wb->W3 : nullptr;
  switch (s.kind) {
    case ExpertKind::linear_relu: {
      TileEpilogue epi;  // out = relu(x·W1 + b1)
      epi.op = Op::bias_act_inplace;
      epi.act = Activation::relu;
      epi.bias = w.b1;
      product(acts.out, Do, xg, d, w.W1, b1, Do, d, epi);
      gg.run();
      break;
    }
    case ExpertKind::mlp: {
      TileEpilogue epi1;  // a1 = x·W1 + b1, hid = act(a1)
      epi1.op = Op::bias_act;
      epi1.act = s.act;
      epi1.bias = w.b1;
      epi1.out = acts.hid;
      product(acts.a1, F, xg, d, w.W1, b1, F, d, epi1);
      gg.run();
      TileEpilogue epi2;  // out = hid·W2 + b2
      epi2.op = Op::bias;
      epi2.bias = w.b2;
      product(acts.out, Do, acts.hid, F, w.W2, b2, Do, F, epi2);
      gg.run();
      break;
    }
    case ExpertKind::swiglu: {
      // hid needs both a1 and a3 tiles, which are different products: a separate pass.
      product(acts.a1, F, xg, d, w.W1, b1, F, d, {});
      product(acts.a3, F, xg, d, w.W3, b3, F, d, {});
      gg.run();
      float *a1 = acts.a1, *a3 = acts.a3, *hid = acts.hid;
#pragma omp parallel for schedule(static) if (R * F >= kParallelMin)
      for (int64_t i = 0; i < R * F; ++i) hid[i] = silu(a1[i]) * a3[i];
      product(acts.out, Do, hid, F, w.W2, b2, Do, F, {});
      gg.run();
      break;
    }
  }
}

void experts_backward(float* dxg, ExpertGrads& g, float* dout, ExpertScratch& scr,
                      const ExpertActs& acts, const float* xg, const ExpertWeights& w,
                      const int64_t* off, const ExpertShape& s, GroupedGemm& gg) {
  const int64_t E = s.E, d = s.d, F = s.F, Do = s.Do, R = off[E];
  if (R == 0) return;
  switch (s.kind) {
    case ExpertKind::linear_relu: {
      // da = dout ⊙ 1[out > 0]: out = relu(a), so out > 0 exactly where a > 0.
      const float* out = acts.out;
#pragma omp parallel for schedule(static) if (R * Do >= kParallelMin)
      for (int64_t i = 0; i < R * Do; ++i)
        if (!(out[i] > 0.0f)) dout[i] = 0.0f;
      if (g.db1) add_bias_grad(g.db1, dout, Do, off, E);
      add_weight_grad(gg, g.dW1, xg, d, dout, Do, off, E);
      add_rowwise(gg, dxg, d, dout, Do, w.W1, true, d, Do, 0.0f, off, E);
      gg.run();
      break;
    }
    case ExpertKind::mlp: {
      if (g.db2) add_bias_grad(g.db2, dout, Do, off, E);
      add_weight_grad(gg, g.dW2, acts.hid, F, dout, Do, off, E);
      add_rowwise(gg, scr.dh, F, dout, Do, w.W2, true, F, Do, 0.0f, off, E);
      gg.run();
      // A separate pass: fused into the dh tiles' epilogue it measured 1–2% slower (B1).
      float* dh = scr.dh;
      const float* a1 = acts.a1;
#pragma omp parallel for schedule(static) if (R * F >= kParallelMin)
      for (int64_t i = 0; i < R * F; ++i) dh[i] *= act_grad(s.act, a1[i]);
      if (g.db1) add_bias_grad(g.db1, dh, F, off, E);
      add_weight_grad(gg, g.dW1, xg, d, dh, F, off, E);
      add_rowwise(gg, dxg, d, dh, F, w.W1, true, d, F, 0.0f, off, E);
      gg.run();
      break;
    }
    case ExpertKind::swiglu: {
      add_weight_grad(gg, g.dW2, acts.hid, F, dout, Do, off, E);
      add_rowwise(gg, scr.dh, F, dout, Do, w.W2, true, F, Do, 0.0f, off, E);
      gg.run();
      float *dh = scr.dh, *da3 = scr.da3;
      const float *a1 = acts.a1, *a3 = acts.a3;
#pragma omp parallel for schedule(static) if (R * F >= kParallelMin)
      for (int64_t i = 0; i < R * F; ++i) {
        da3[i] = dh[i] * silu(a1[i]);
        dh[i] *= a3[i] * act_grad(Activation::silu, a1[i]);  // becomes da1
      }
      add_weight_grad(gg, g.dW1, xg, d, dh, F, off, E);
      add_weight_grad(gg, g.dW3, xg, d, da3, F, off, E);
      add_rowwise(gg, dxg, d, dh, F, w.W1, true, d, F, 0.0f, off, E);
      gg.run();
      add_rowwise(gg, dxg, d, da3, F, w.W3, true, d, F, 1.0f, off, E);
      gg.run();
      break;
    }
  }
}

}  // namespace moe::detail
