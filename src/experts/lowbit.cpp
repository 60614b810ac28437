#include "experts/lowbit.hpp"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>

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
  if (f.code_bits == 8 || v.format == QuantFormatId::mxfp4) quant_vbmi();  // MOE_VBMI refused here
  if (v.tiled && quant_tiling_wanted(v)) {  // a held matrix's copy: its tiles as they are
    const int64_t tiles = v.N / kQuantTileCols, bk = v.blocks_k(), sb = scale_size(f.scale);
    const int64_t tile = kQuantTileCols * v.sub_blocks() * 16, block = kQuantTileCols * bk;
    codes.resize(static_cast<size_t>(tiles * tile));
    scales.resize(static_cast<size_t>(tiles * block * sb));
    zeros.resize(v.zero_points ? static_cast<size_t>(tiles * block) : 0);
    for (int64_t t = 0; t < tiles; ++t) {
      std::memcpy(codes.data() + t * tile, v.codes + t * v.code_stride, static_cast<size_t>(tile));
      std::memcpy(scales.data() + t * block * sb,
                  static_cast<const uint8_t*>(v.scales) + t * v.scale_stride * kQuantTileCols * sb,
                  static_cast<size_t>(block * sb));
      if (v.zero_points)
        std::memcpy(zeros.data() + t * block, v.zeros + t * v.zero_stride * kQuantTileCols,
                    static_cast<size_t>(block));
    }
    perm.assign(v.act_order ? v.perm : nullptr, v.act_order ? v.perm + v.K : nullptr);
    m = v;
    m.code_stride = tile;
    m.scale_stride = bk;
    m.zero_stride = v.zero_points ? bk : 0;
    m.codes = codes.data();
    m.scales = scales.data();
    m.zeros = v.zero_points ? zeros.data() : nullptr;
    m.perm = v.act_order ? perm.data() : nullptr;
    return;
  }
  if (v.tiled) {  // tiling not wanted here (another ISA level): back to columns
    QuantStorage s;
    adopt(quant_untiled(v, 0, v.N, s));
    return;
  }
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
  if (quant_tiling_wanted(m)) {  // the layout the decode kernel reads fastest
    QuantStorage s;
    const QuantMatrix t = quant_tiled(m, s);
    codes.swap(s.codes);
    scales.swap(s.scales);
    zeros.swap(s.zeros);
    m = t;
    m.codes = codes.data();
    m.scales = scales.data();
    m.zeros = m.zero_points ? zeros.data() : nullptr;
  }
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

namespace {
// The epilogues of experts_forward_quant, on columns [n0, n0 + n) of an expert's M rows.
// z = pre + b1, then act(z) into post (pre keeps z), or into pre itself when post is null.
void bias_act(const QuantExpertEpilogue& e, float* pre, float* post, int64_t ld, Activation a,
              int64_t n0, int64_t n) {
  for (int64_t r = 0; r < e.M; ++r)
    for (int64_t j = n0; j < n0 + n; ++j) {
      const float z = pre[r * ld + j] + (e.b1 ? e.b1[j] : 0.0f);
      if (post) {
        pre[r * ld + j] = z;
        post[r * ld + j] = act_forward(a, z);
      } else {
        pre[r * ld + j] = act_forward(a, z);
      }
    }
}
void epilogue_relu(const void* ctx, int64_t n0, int64_t n) {
  const auto& e = *static_cast<const QuantExpertEpilogue*>(ctx);
  bias_act(e, e.out, nullptr, e.s->Do, Activation::relu, n0, n);
}
void epilogue_act(const void* ctx, int64_t n0, int64_t n) {
  const auto& e = *static_cast<const QuantExpertEpilogue*>(ctx);
  bias_act(e, e.a1, e.hid, e.s->F, e.s->act, n0, n);
}
void epilogue_glu(const void* ctx, int64_t n0, int64_t n) {
  const auto& e = *static_cast<const QuantExpertEpilogue*>(ctx);
  const int64_t F = e.s->F;
  const bool clamped = e.s->kind == ExpertKind::clamped_swiglu;
  const float alpha = e.s->alpha, limit = e.s->limit;
  for (int64_t r = 0; r < e.M; ++r) {
    float* g = e.a1 + r * F + n0;
    float* u = e.a3 + r * F + n0;
    float* h = e.hid + r * F + n0;
    if (e.b1)
      for (int64_t j = 0; j < n; ++j) g[j] += e.b1[n0 + j];
    if (e.b3)
      for (int64_t j = 0; j < n; ++j) u[j] += e.b3[n0 + j];
    if (clamped)
      for (int64_t j = 0; j < n; ++j) h[j] = clamped_swiglu_f32(g[j], u[j], alpha, limit);
    else
      for (int64_t j = 0; j < n; ++j) h[j] = silu_f32(g[j]) * u[j];
  }
}
void epilogue_bias2(const void* ctx, int64_t n0, int64_t n) {
  const auto& e = *static_cast<const QuantExpertEpilogue*>(ctx);
  const int64_t Do = e.s->Do;
  for (int64_t r = 0; r < e.M; ++r)
    for (int64_t j = n0; j < n0 + n; ++j) e.out[r * Do + j] += e.b2[j];
}
}  // namespace

void experts_forward_quant(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                           const int64_t* off, const ExpertShape& s, ExpertWeightsQuant& wq,
                           ExpertScratchQuant& sc) {
  const int64_t d = s.d, F = s.F, Do = s.Do;
  if (off[s.E] == 0) return;
  wq.prepare(w, s);
  // Two groups of products over every expert with rows (quant_matmul_grouped: no barrier per
  // expert): W1 (and W3 on the same rows) with the bias and the activation on each tile, then
  // W2 with its bias.
  sc.epis.resize(static_cast<size_t>(s.E));
  sc.products.clear();
  sc.products.reserve(static_cast<size_t>(s.E));
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t r0 = off[e], M = off[e + 1] - off[e];
    if (M == 0) continue;
    const size_t ei = static_cast<size_t>(e);
    QuantExpertEpilogue& ep = sc.epis[ei];
    ep.s = &s;
    ep.M = M;
    ep.a1 = acts.a1 ? acts.a1 + r0 * F : nullptr;
    ep.a3 = acts.a3 ? acts.a3 + r0 * F : nullptr;
    ep.hid = acts.hid ? acts.hid + r0 * F : nullptr;
    ep.out = acts.out + r0 * Do;
    ep.b1 = w.b1 ? w.b1 + e * (s.kind == ExpertKind::linear_relu ? Do : F) : nullptr;
    ep.b2 = w.b2 ? w.b2 + e * Do : nullptr;
    ep.b3 = w.b3 ? w.b3 + e * F : nullptr;
    QuantProduct p;
    p.X = xg + r0 * d;
    p.ldx = d;
    p.M = M;
    p.ctx = &ep;
    p.W[0] = &wq.W1[ei].m;
    switch (s.kind) {
      case ExpertKind::linear_relu:
        p.C[0] = ep.out;
        p.ldc = Do;
        p.epilogue = epilogue_relu;
        break;
      case ExpertKind::mlp:
        p.C[0] = ep.a1;
        p.ldc = F;
        p.epilogue = epilogue_act;
        break;
      case ExpertKind::swiglu:
      case ExpertKind::clamped_swiglu:
        p.C[0] = ep.a1;
        p.ldc = F;
        p.epilogue = epilogue_glu;
        if (quant_rows_shared(wq.W1[ei].m, wq.W3[ei].m)) {
          p.W[1] = &wq.W3[ei].m;
          p.C[1] = ep.a3;
          p.count = 2;
        } else {  // two permutations (act-order): W3 first, on its own rows
          QuantProduct p3 = p;
          p3.W[0] = &wq.W3[ei].m;
          p3.C[0] = ep.a3;
          p3.epilogue = nullptr;
          sc.products.push_back(p3);
        }
        break;
    }
    sc.products.push_back(p);
  }
  // (An act-order W3 on its own rows must finish before its W1's glu epilogue: run them apart.)
  const auto run = [&](bool w3_alone) {
    std::vector<QuantProduct>& ps = sc.products;
    if (!w3_alone) return quant_matmul_grouped(ps, sc.ws);
    std::vector<QuantProduct> first, second;
    for (const QuantProduct& q : ps) (q.epilogue ? second : first).push_back(q);
    quant_matmul_grouped(first, sc.ws);
    quant_matmul_grouped(second, sc.ws);
  };
  run(std::any_of(sc.products.begin(), sc.products.end(),
                  [](const QuantProduct& q) { return !q.epilogue; }));
  if (s.kind == ExpertKind::linear_relu) return;
  sc.products.clear();
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t r0 = off[e], M = off[e + 1] - off[e];
    if (M == 0) continue;
    const size_t ei = static_cast<size_t>(e);
    QuantProduct p;
    p.W[0] = &wq.W2[ei].m;
    p.C[0] = sc.epis[ei].out;
    p.X = acts.hid + r0 * F;
    p.ldx = F;
    p.M = M;
    p.ldc = Do;
    p.ctx = &sc.epis[ei];
    p.epilogue = sc.epis[ei].b2 ? epilogue_bias2 : nullptr;
    sc.products.push_back(p);
  }
  quant_matmul_grouped(sc.products, sc.ws);
}

}  // namespace moe::detail
