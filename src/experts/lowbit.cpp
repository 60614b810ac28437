#include "experts/lowbit.hpp"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <functional>

#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/activation.hpp"
#include "quant/fp8.hpp"
#include "quant/mxfp4.hpp"

namespace moe::detail {

namespace {

int64_t scale_size(QuantScale s) { return s == QuantScale::f16 ? 2 : s == QuantScale::e8m0 ? 1 : 4; }

// (K, N) of matrix 1 (W1), 2 (W2) or 3 (W3) of a stack of shape s.
void matrix_dims(int matrix, const ExpertShape& s, int64_t* K, int64_t* N) {
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  *K = matrix == 2 ? s.F : s.d;
  *N = matrix == 1 ? mid : matrix == 2 ? s.Do : s.F;
}

bool has_matrix(int matrix, const ExpertShape& s) {
  if (matrix == 1) return true;
  if (matrix == 2) return s.kind != ExpertKind::linear_relu;
  return s.kind == ExpertKind::swiglu || s.kind == ExpertKind::clamped_swiglu;
}

const char* const kMatrixName[] = {"", "W1", "W2", "W3"};

// A zero matrix of the format (codes of value 0, finite scales).
QuantHeld zero_matrix(Precision p, const Int4Options& opt, int64_t K, int64_t N) {
  QuantHeld h;
  switch (p) {
    case Precision::int4: {
      Int4Kernel::Weights w;
      w.resize(K, N, opt.group, opt.zero_points);
      h.adopt(w.view());
      break;
    }
    case Precision::mxfp4: {
      Mxfp4Kernel::Weights w;
      w.resize(K, N);
      h.adopt(w.view());
      break;
    }
    default: {
      MOE_ASSERT(p == Precision::fp8);
      Fp8Kernel::Weights w;
      w.resize(K, N);
      h.adopt(w.view());
      break;
    }
  }
  return h;
}

// Runs f(t) for t in [0, n) over the threads; the first error is thrown after the loop (never
// inside the parallel region).
template <typename F>
void parallel_tasks(int64_t n, F&& f) {
  std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t t = 0; t < n; ++t) {
    try {
      f(t);
    } catch (...) {
#pragma omp critical(moe_lowbit_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace

QuantFormatId quant_format_of(Precision p) {
  MOE_ASSERT(low_bit(p));
  return p == Precision::int4 ? QuantFormatId::int4
         : p == Precision::mxfp4 ? QuantFormatId::mxfp4
                                 : QuantFormatId::fp8;
}

int64_t lowbit_matrix_bytes(Precision p, const Int4Options& opt, int64_t K, int64_t N) {
  QuantMatrix m;
  m.format = quant_format_of(p);
  m.K = K;
  m.N = N;
  m.block_k = m.format == QuantFormatId::int4 ? opt.group : m.fmt().block_k;
  m.zero_points = m.format == QuantFormatId::int4 && opt.zero_points;
  return m.stored_bytes();
}

void QuantHeld::adopt(const QuantMatrix& v) {
  validate(v);
  const QuantFormat& f = v.fmt();
  QuantMatrix d = v;
  // Codes: each column's bytes, densely.
  const int64_t col = f.code_bits == 4 ? v.sub_blocks() * 16 : v.K;
  codes.resize(static_cast<size_t>(v.N * col));
  for (int64_t j = 0; j < v.N; ++j)
    std::memcpy(codes.data() + j * col, v.codes + j * v.code_stride, static_cast<size_t>(col));
  d.code_stride = col;
  // Scales: one row of blocks_k per scale row.
  const int64_t sb = scale_size(f.scale), bk = v.blocks_k(), bn = v.blocks_n();
  scales.resize(static_cast<size_t>(bn * bk * sb));
  for (int64_t r = 0; r < bn; ++r)
    std::memcpy(scales.data() + r * bk * sb,
                static_cast<const uint8_t*>(v.scales) + r * v.scale_stride * sb,
                static_cast<size_t>(bk * sb));
  d.scale_stride = bk;
  zeros.clear();
  if (v.zero_points) {
    zeros.resize(static_cast<size_t>(v.N * bk));
    for (int64_t j = 0; j < v.N; ++j)
      std::memcpy(zeros.data() + j * bk, v.zeros + j * v.zero_stride, static_cast<size_t>(bk));
    d.zero_stride = bk;
  }
  perm.clear();
  if (v.act_order) perm.assign(v.perm, v.perm + v.K);
  d.codes = codes.data();
  d.scales = scales.data();
  d.zeros = v.zero_points ? zeros.data() : nullptr;
  d.perm = v.act_order ? perm.data() : nullptr;
  m = d;
}

QuantHeld quantize_matrix(Precision p, const Int4Options& opt, const float* W, int64_t K,
                          int64_t N) {
  QuantHeld h;
  switch (p) {
    case Precision::int4: h.adopt(quantize_int4(W, K, N, opt).view()); break;
    case Precision::mxfp4: h.adopt(quantize_mxfp4(W, K, N).view()); break;
    default:
      MOE_ASSERT(p == Precision::fp8);
      h.adopt(quantize_fp8(W, K, N).view());
      break;
  }
  return h;
}

void ExpertWeightsQuant::shape(const ExpertShape& s) {
  for (int matrix = 1; matrix <= 3; ++matrix) {
    std::vector<QuantHeld>& st = stack(matrix);
    st.clear();
    if (!has_matrix(matrix, s)) continue;
    int64_t K, N;
    matrix_dims(matrix, s, &K, &N);
    const QuantHeld zero = zero_matrix(precision, int4, K, N);
    st.assign(static_cast<size_t>(s.E), zero);
  }
}

void ExpertWeightsQuant::prepare(const ExpertWeights& w, const ExpertShape& s) {
  if (ready) return;
  MOE_ASSERT(!fixed);
  shape(s);
  const float* src[4] = {nullptr, w.W1, w.W2, w.W3};
  // Every (matrix, expert) on its own: libmoe's int4 quantizer searches per group, which
  // costs more than reading the weights.
  parallel_tasks(3 * s.E, [&](int64_t t) {
    const int matrix = static_cast<int>(t / s.E) + 1;
    const int64_t e = t % s.E;
    if (!has_matrix(matrix, s)) return;
    int64_t K, N;
    matrix_dims(matrix, s, &K, &N);
    stack(matrix)[static_cast<size_t>(e)] =
        quantize_matrix(precision, int4, src[matrix] + e * K * N, K, N);
  });
  ready = true;
}

void ExpertWeightsQuant::assign(int matrix, int64_t e, const float* src, const ExpertShape& s) {
  MOE_ASSERT(matrix >= 1 && matrix <= 3 && has_matrix(matrix, s) && e >= 0 && e < s.E);
  int64_t K, N;
  matrix_dims(matrix, s, &K, &N);
  stack(matrix)[static_cast<size_t>(e)] = quantize_matrix(precision, int4, src, K, N);
}

void ExpertWeightsQuant::assign_stored(int matrix, int64_t e, const QuantMatrix& v,
                                       const ExpertShape& s) {
  MOE_ASSERT(matrix >= 1 && matrix <= 3 && has_matrix(matrix, s) && e >= 0 && e < s.E);
  int64_t K, N;
  matrix_dims(matrix, s, &K, &N);
  MOE_REQUIRE(v.format == quant_format_of(precision), kMatrixName[matrix], " of expert ", e,
              ": stored as ", v.fmt().name, ", but the layer's precision is ",
              to_string(precision));
  MOE_REQUIRE(v.K == K && v.N == N, kMatrixName[matrix], " of expert ", e, ": stored (K, N) = (",
              v.K, ", ", v.N, "), the layer expects (", K, ", ", N, ")");
  stack(matrix)[static_cast<size_t>(e)].adopt(v);
}

void ExpertWeightsQuant::read(int matrix, float* out, const ExpertShape& s) const {
  int64_t K, N;
  matrix_dims(matrix, s, &K, &N);
  std::vector<double> d(static_cast<size_t>(K * N));
  const std::vector<QuantHeld>& st = stack(matrix);
  MOE_ASSERT(static_cast<int64_t>(st.size()) == s.E);
  for (int64_t e = 0; e < s.E; ++e) {
    quant_dequant_ref(st[static_cast<size_t>(e)].m, d.data());
    for (int64_t i = 0; i < K * N; ++i) out[e * K * N + i] = static_cast<float>(d[static_cast<size_t>(i)]);
  }
}

int64_t ExpertWeightsQuant::bytes() const {
  int64_t b = 0;
  for (int matrix = 1; matrix <= 3; ++matrix)
    for (const QuantHeld& h : stack(matrix)) b += h.bytes();
  return b;
}

std::string lowbit_kernel_names(Precision p, const Int4Options& opt) {
  QuantMatrix m;
  m.format = quant_format_of(p);
  m.block_k = m.format == QuantFormatId::int4 ? opt.group : m.fmt().block_k;
  m.zero_points = m.format == QuantFormatId::int4 && opt.zero_points;
  return "decode " + quant_kernel_name(m, quant_decode_path(m.format)) + "; prefill " +
         quant_prefill_kernel_name(m, quant_prefill_path(m.format));
}

void experts_forward_quant(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                           const int64_t* off, const ExpertShape& s, ExpertWeightsQuant& wq,
                           ExpertScratchQuant& sc) {
  const int64_t d = s.d, F = s.F, Do = s.Do;
  if (off[s.E] == 0) return;
  wq.prepare(w, s);
  // C_m (M, N) = X · W_m with the kernel M rows take, spread over the threads by column tiles,
  // then epi(n0, n) on each tile's columns of all rows while in cache (the bias, the
  // activation). Several matrices share one preparation of the rows where their K orders agree
  // (a GLU's W1 and W3; everywhere but act-order checkpoints with two permutations).
  using Epi = std::function<void(int64_t, int64_t)>;
  const auto products = [&](const QuantHeld* const* Ws, float* const* Cs, int count,
                            const float* X, int64_t ldx, int64_t M, int64_t ldc, const Epi& epi) {
    const QuantMethod method = quant_method_for(M, Ws[0]->m.format);
    const QuantPath path = method == QuantMethod::decode ? quant_decode_path(Ws[0]->m.format)
                                                         : quant_prefill_path(Ws[0]->m.format);
    const QuantMatrix* ms[2] = {&Ws[0]->m, count > 1 ? &Ws[1]->m : nullptr};
    if (count == 1 || quant_rows_shared(*ms[0], *ms[1])) {
      quant_matmul_shared(ms, Cs, count, path, method, X, ldx, M, ldc, sc.ws, epi);
      return;
    }
    quant_matmul_shared(ms, Cs, 1, path, method, X, ldx, M, ldc, sc.ws);
    quant_matmul_shared(ms + 1, Cs + 1, 1, path, method, X, ldx, M, ldc, sc.ws, epi);
  };
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t r0 = off[e], M = off[e + 1] - off[e];
    if (M == 0) continue;
    const float* x = xg + r0 * d;
    const size_t ei = static_cast<size_t>(e);
    switch (s.kind) {
      case ExpertKind::linear_relu: {
        float* out = acts.out + r0 * Do;
        const float* b1 = w.b1 ? w.b1 + e * Do : nullptr;
        const QuantHeld* Ws[1] = {&wq.W1[ei]};
        float* Cs[1] = {out};
        products(Ws, Cs, 1, x, d, M, Do, [&](int64_t n0, int64_t n) {
          for (int64_t r = 0; r < M; ++r)
            for (int64_t j = n0; j < n0 + n; ++j) {
              const float z = out[r * Do + j] + (b1 ? b1[j] : 0.0f);
              out[r * Do + j] = z > 0.0f ? z : 0.0f;
            }
        });
        continue;
      }
      case ExpertKind::mlp: {
        float* a1 = acts.a1 + r0 * F;
        float* hid = acts.hid + r0 * F;
        const float* b1 = w.b1 ? w.b1 + e * F : nullptr;
        const QuantHeld* Ws[1] = {&wq.W1[ei]};
        float* Cs[1] = {a1};
        products(Ws, Cs, 1, x, d, M, F, [&](int64_t n0, int64_t n) {
          for (int64_t r = 0; r < M; ++r)
            for (int64_t j = n0; j < n0 + n; ++j) {
              const float z = a1[r * F + j] + (b1 ? b1[j] : 0.0f);
              a1[r * F + j] = z;
              hid[r * F + j] = act_forward(s.act, z);
            }
        });
        break;
      }
      case ExpertKind::swiglu:
      case ExpertKind::clamped_swiglu: {
        float* a1 = acts.a1 + r0 * F;
        float* a3 = acts.a3 + r0 * F;
        float* hid = acts.hid + r0 * F;
        const float* b1 = w.b1 ? w.b1 + e * F : nullptr;
        const float* b3 = w.b3 ? w.b3 + e * F : nullptr;
        const bool clamped = s.kind == ExpertKind::clamped_swiglu;
        const float alpha = s.alpha, limit = s.limit;
        const QuantHeld* Ws[2] = {&wq.W1[ei], &wq.W3[ei]};
        float* Cs[2] = {a1, a3};
        products(Ws, Cs, 2, x, d, M, F, [&](int64_t n0, int64_t n) {
          for (int64_t r = 0; r < M; ++r) {
            float* g = a1 + r * F + n0;
            float* u = a3 + r * F + n0;
            float* h = hid + r * F + n0;
            if (b1)
              for (int64_t j = 0; j < n; ++j) g[j] += b1[n0 + j];
            if (b3)
              for (int64_t j = 0; j < n; ++j) u[j] += b3[n0 + j];
            if (clamped)
              for (int64_t j = 0; j < n; ++j) h[j] = clamped_swiglu_f32(g[j], u[j], alpha, limit);
            else
              for (int64_t j = 0; j < n; ++j) h[j] = silu_f32(g[j]) * u[j];
          }
        });
        break;
      }
    }
    float* out = acts.out + r0 * Do;
    const float* b2 = w.b2 ? w.b2 + e * Do : nullptr;
    const QuantHeld* Ws[1] = {&wq.W2[ei]};
    float* Cs[1] = {out};
    products(Ws, Cs, 1, acts.hid + r0 * F, F, M, Do, [&](int64_t n0, int64_t n) {
      if (b2)
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = n0; j < n0 + n; ++j) out[r * Do + j] += b2[j];
    });
  }
}

}  // namespace moe::detail
