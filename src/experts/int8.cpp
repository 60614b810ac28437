#include "experts/int8.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/check.hpp"
#include "common/cpu.hpp"
#include "common/parallel.hpp"
#include "experts/activation.hpp"
#include "kernels/amx_gemm.hpp"

namespace moe::detail {

namespace {

constexpr int64_t kCols = Int8Stack::kCols;
constexpr int kMaxRows = 6;  // rows per register tile: 6 × 4 accumulators of 16 columns

template <typename T>
T* grown(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// acc (MR, 64) = Σ_k A rows (MR, K4·4 bytes, u8) · B block (K4 groups of 64 columns × 4 s8).
// The VNNI kernel: per group of 4 k, 4 loads of B feed MR × 4 vpdpbusd.
// The loops over the tile are unrolled on purpose: left to itself GCC 12 kept c[][] in
// memory (a copy, a vpdpbusd and a spill per accumulator and group of K: the int8 Mixtral
// block ran at half its speed); whole, every accumulator stays in its register.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    int32_t* acc, const uint8_t* A, int64_t lda, const int8_t* B, int64_t K4) {
  __m512i c[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* b = B + k * 256;
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64),
                  b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + 4 * k, 4);
      const __m512i a = _mm512_set1_epi32(a4);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], a, b2);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], a, b3);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_si512(acc + r * kCols + 16 * v, c[r][v]);
}

template <int MR>
void tile_portable(int32_t* acc, const uint8_t* A, int64_t lda, const int8_t* B, int64_t K4) {
  int32_t c[MR][kCols] = {};
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* b = B + k * 256;
    for (int r = 0; r < MR; ++r) {
      const uint8_t* a = A + r * lda + 4 * k;
      const int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      for (int64_t j = 0; j < kCols; ++j)
        c[r][j] += a0 * b[4 * j] + a1 * b[4 * j + 1] + a2 * b[4 * j + 2] + a3 * b[4 * j + 3];
    }
  }
  std::memcpy(acc, c, sizeof(c));
}

template <int MR>
void tile(bool vnni, int32_t* acc, const uint8_t* A, int64_t lda, const int8_t* B, int64_t K4) {
  if (vnni)
    tile_vnni<MR>(acc, A, lda, B, K4);
  else
    tile_portable<MR>(acc, A, lda, B, K4);
}

void tile_rows(int mr, int32_t* acc, const uint8_t* A, int64_t lda, const int8_t* B, int64_t K4) {
  const bool v = vnni_kernels();
  switch (mr) {
    case 1: return tile<1>(v, acc, A, lda, B, K4);
    case 2: return tile<2>(v, acc, A, lda, B, K4);
    case 3: return tile<3>(v, acc, A, lda, B, K4);
    case 4: return tile<4>(v, acc, A, lda, B, K4);
    case 5: return tile<5>(v, acc, A, lda, B, K4);
    default: return tile<6>(v, acc, A, lda, B, K4);
  }
}

// One product of the forward: C rows of expert e = dequant(A · B_e) + bias, then the
// epilogue: C = z (none), C = act(z) (act_inplace), or C = z and out = act(z) (act_out).
struct Product {
  // glu: a pair (B2, C2, bias2), and out = silu(C)·C2 or clamped_swiglu(C, C2) per block.
  enum class Epi { none, act_inplace, act_out, glu };
  const Int8Stack* B = nullptr;
  int64_t e = 0;
  const uint8_t* A = nullptr;
  int64_t lda = 0;
  const float* a_scale = nullptr;
  int64_t M = 0;
  float* C = nullptr;
  int64_t ldc = 0;
  const float* bias = nullptr;  // (N) of expert e, or null
  Epi epi = Epi::none;
  Activation act = Activation::relu;
  float* out = nullptr;  // like C (act_out, glu)
  const Int8Stack* B2 = nullptr;  // glu: the pair's second weight, its output and bias
  float* C2 = nullptr;
  const float* bias2 = nullptr;
  bool clamped = false;
  float alpha = 1.702f, limit = 7.0f;
};

// The int32 sums of rows [m0, m0 + mr) × block nb of product p into acc (mr, 64).
void block_sums(const Product& p, const Int8Stack& B, int64_t nb, int64_t m0, int64_t mr,
                int32_t* acc) {
  const int8_t* Bb = B.block(p.e, nb);
  if (amx_kernels() && mr >= cpu().amx_min_rows) {
    AmxGemmArgs g;
    g.M = mr;
    g.n = kCols;
    g.kbytes = g.a_bytes = B.K4 * 4;
    g.A = p.A + m0 * p.lda;
    g.lda = p.lda;
    g.pad = 128;  // the rows are padded already (quantize_rows_u8): never read
    g.B = reinterpret_cast<const uint8_t*>(Bb);
    g.panel_bytes = B.K4 * 256;
    g.C = acc;
    g.ldc = kCols;
    amx_gemm_run(g, AmxOp::u8s8, !amx_hardware());
    return;
  }
  for (int64_t r0 = 0; r0 < mr; r0 += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, mr - r0));
    tile_rows(rows, acc + r0 * kCols, p.A + (m0 + r0) * p.lda, p.lda, Bb, B.K4);
  }
}

// Rows [0, M) × block nb of product p: the sums (all rows at once on AMX, which reads the
// block's weights once for up to 32 rows; 6 at a time otherwise), then the epilogue.
void run_stack(const Product& p, const Int8Stack& B, float* C, const float* bias,
               Product::Epi epi, int64_t nb) {
  const int64_t j0 = nb * kCols, nc = std::min(kCols, B.N - j0);
  const float* sw = B.scale.data() + p.e * B.NB * kCols + j0;
  const int32_t* cs = B.colsum.data() + p.e * B.NB * kCols + j0;
  constexpr int64_t kRowsPerPass = 256;  // bounds the sums' buffer
  thread_local std::vector<int32_t> sums;
  for (int64_t m0 = 0; m0 < p.M; m0 += kRowsPerPass) {
    const int64_t mr = std::min(kRowsPerPass, p.M - m0);
    int32_t* acc = grown(sums, mr * kCols);
    block_sums(p, B, nb, m0, mr, acc);
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t row = m0 + r;
      const float sx = p.a_scale[row];
      float* c = C + row * p.ldc + j0;
      const int32_t* a = acc + r * kCols;
      for (int64_t j = 0; j < nc; ++j) {
        const float z = static_cast<float>(a[j] - 128 * cs[j]) * sx * sw[j] +
                        (bias ? bias[j0 + j] : 0.0f);
        switch (epi) {
          case Product::Epi::none:
          case Product::Epi::glu: c[j] = z; break;
          case Product::Epi::act_inplace: c[j] = act_forward(p.act, z); break;
          case Product::Epi::act_out:
            c[j] = z;
            p.out[row * p.ldc + j0 + j] = act_forward(p.act, z);
            break;
        }
      }
    }
  }
}

// Rows [0, M) × block nb of product p: the sums (all rows at once on AMX, which reads the
// block's weights once for up to 32 rows; 6 at a time otherwise), then the epilogue; a pair
// (glu) computes both products' blocks, then the hidden values from both while in cache.
void run_block(const Product& p, int64_t nb) {
  run_stack(p, *p.B, p.C, p.bias, p.epi, nb);
  if (p.epi != Product::Epi::glu) return;
  run_stack(p, *p.B2, p.C2, p.bias2, p.epi, nb);
  const int64_t j0 = nb * kCols, nc = std::min(kCols, p.B->N - j0);
  const float alpha = p.alpha, limit = p.limit;
  for (int64_t row = 0; row < p.M; ++row) {
    const float* a1 = p.C + row * p.ldc + j0;
    const float* a3 = p.C2 + row * p.ldc + j0;
    float* h = p.out + row * p.ldc + j0;
    if (p.clamped)
      for (int64_t j = 0; j < nc; ++j) h[j] = clamped_swiglu_f32(a1[j], a3[j], alpha, limit);
    else
      for (int64_t j = 0; j < nc; ++j) h[j] = silu_f32(a1[j]) * a3[j];
  }
}

// Every product's column blocks as one parallel loop; each block sums over the whole K, so
// the split never changes a value.
void run_products(const std::vector<Product>& ps) {
  std::vector<std::pair<int32_t, int32_t>> tasks;
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps[i].M > 0)
      for (int64_t nb = 0; nb < ps[i].B->NB; ++nb)
        tasks.emplace_back(static_cast<int32_t>(i), static_cast<int32_t>(nb));
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t t = 0; t < n; ++t) run_block(ps[tasks[t].first], tasks[t].second);
}

// The products of one weight for every expert with rows.
void add_products(std::vector<Product>& ps, const Int8Stack& B, const uint8_t* A,
                  const float* a_scale, float* C, const float* bias, const int64_t* off,
                  Product::Epi epi, Activation act, float* out) {
  const int64_t lda = B.K4 * 4, N = B.N;
  for (int64_t e = 0; e < B.E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    Product p;
    p.B = &B;
    p.e = e;
    p.A = A + off[e] * lda;
    p.lda = lda;
    p.a_scale = a_scale + off[e];
    p.M = n;
    p.C = C + off[e] * N;
    p.ldc = N;
    p.bias = bias ? bias + e * N : nullptr;
    p.epi = epi;
    p.act = act;
    p.out = out ? out + off[e] * N : nullptr;
    ps.push_back(p);
  }
}

#define MOE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// The AVX-512 halves of quantize_row_u8: each handles the whole 16-value blocks and returns
// how many values it did; the scalar loops finish the row with the same arithmetic. maskz
// forms throughout: GCC 12 warns falsely on the unmasked intrinsics' undefined pass-through.
MOE_AVX512_TARGET int64_t amax_avx512(const float* src, int64_t cols, float* amax, bool* nan) {
  const __mmask16 all = 0xffff;
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 vnan = 0;
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m512 v = _mm512_loadu_ps(src + c);
    vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude));
    vmax = _mm512_maskz_max_ps(all, vmax, a);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, vmax);
  for (float l : lanes) *amax = l > *amax ? l : *amax;
  *nan = vnan != 0;
  return c;
}

MOE_AVX512_TARGET int64_t quantize_avx512(uint8_t* dst, const float* src, int64_t cols,
                                          float scale) {
  const __mmask16 all = 0xffff;
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  const __m512i off = _mm512_set1_epi32(128);
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m512 r = _mm512_maskz_roundscale_ps(all, _mm512_maskz_div_ps(all, _mm512_loadu_ps(src + c), s),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_maskz_max_ps(all, _mm512_maskz_min_ps(all, r, hi), lo);
    const __m512i q = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(all, r), off);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_maskz_cvtepi32_epi8(all, q));
  }
  return c;
}

void quantize_row_u8(uint8_t* dst, int64_t ldd, float* scale_out, const float* src,
                     int64_t cols) {
  const bool wide = isa_at_least(Isa::avx512);
  float amax = 0.0f;
  bool nan = false;
  int64_t c = wide ? amax_avx512(src, cols, &amax, &nan) : 0;
  for (; c < cols; ++c) {
    const float a = std::fabs(src[c]);
    amax = a > amax ? a : amax;
    nan = nan || src[c] != src[c];
  }
  const float scale = int8_scale(amax, nan);
  *scale_out = scale;
  if (scale == 0.0f) {
    std::memset(dst, 128, static_cast<size_t>(ldd));
    return;
  }
  c = wide ? quantize_avx512(dst, src, cols, scale) : 0;
  for (; c < cols; ++c) dst[c] = static_cast<uint8_t>(quantize_int8(src[c], scale) + 128);
  std::memset(dst + cols, 128, static_cast<size_t>(ldd - cols));
}

}  // namespace

const char* int8_kernel_name() {
  if (amx_kernels())
    return amx_hardware() ? "amx_int8 (tdpbusd; avx512_vnni below MOE_AMX_MIN_ROWS rows)"
                          : "amx_int8 emulated (MOE_AMX_EMULATE; tests only)";
  return vnni_kernels() ? "avx512_vnni" : "portable";
}

void quantize_rows_u8(uint8_t* dst, int64_t ldd, float* scales, const float* src, int64_t lds,
                      int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r)
    quantize_row_u8(dst + r * ldd, ldd, scales + r, src + r * lds, cols);
}

void gemm_u8s8_expert(float* C, int64_t ldc, const uint8_t* A, int64_t lda, const float* a_scale,
                      int64_t M, const Int8Stack& B, int64_t e) {
  Product p;
  p.B = &B;
  p.e = e;
  p.A = A;
  p.lda = lda;
  p.a_scale = a_scale;
  p.M = M;
  p.C = C;
  p.ldc = ldc;
  for (int64_t nb = 0; nb < B.NB; ++nb) run_block(p, nb);
}

void Int8Stack::resize(int64_t E_, int64_t K_, int64_t N_) {
  E = E_;
  K = K_;
  N = N_;
  K4 = (K + kK4Align * 4 - 1) / (kK4Align * 4) * kK4Align;  // whole AMX tiles of K
  NB = (N + kCols - 1) / kCols;
  q.assign(static_cast<size_t>(E * NB * K4 * 256), 0);
  scale.assign(static_cast<size_t>(E * NB * kCols), 0.0f);
  colsum.assign(static_cast<size_t>(E * NB * kCols), 0);
}

void Int8Stack::assign(int64_t e, const float* W) {
  MOE_ASSERT(e >= 0 && e < E);
#pragma omp parallel for schedule(static) if (K * N >= kParallelMin)
  for (int64_t nb = 0; nb < NB; ++nb) {
    const int64_t j0 = nb * kCols, nc = std::min(kCols, N - j0);
    float amax[kCols] = {};
    bool nan[kCols] = {};
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < nc; ++j) {
        const float v = W[k * N + j0 + j], a = std::fabs(v);
        amax[j] = a > amax[j] ? a : amax[j];
        nan[j] = nan[j] || v != v;
      }
    float* sc = scale.data() + e * NB * kCols + j0;
    int32_t* cs = colsum.data() + e * NB * kCols + j0;
    int8_t* blk = q.data() + (e * NB + nb) * K4 * 256;
    for (int64_t j = 0; j < kCols; ++j) {
      sc[j] = j < nc ? int8_scale(amax[j], nan[j]) : 0.0f;
      cs[j] = 0;
    }
    std::memset(blk, 0, static_cast<size_t>(K4 * 256));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < nc; ++j) {
        const int8_t v = quantize_int8(W[k * N + j0 + j], sc[j]);
        blk[(k / 4) * 256 + j * 4 + k % 4] = v;
        cs[j] += v;
      }
  }
}

void ExpertWeightsInt8::shape(const ExpertShape& s) {
  const bool hidden = s.kind != ExpertKind::linear_relu;
  const int64_t mid = hidden ? s.F : s.Do;
  if (W1.E != s.E || W1.K != s.d || W1.N != mid) W1.resize(s.E, s.d, mid);
  const int64_t E2 = hidden ? s.E : 0, E3 = gated_kind(s.kind) ? s.E : 0;
  if (W2.E != E2 || W2.K != s.F || W2.N != s.Do) W2.resize(E2, s.F, s.Do);
  if (W3.E != E3 || W3.K != s.d || W3.N != s.F) W3.resize(E3, s.d, s.F);
}

void ExpertWeightsInt8::prepare(const ExpertWeights& w, const ExpertShape& s) {
  if (ready) return;
  shape(s);
  for (int64_t e = 0; e < s.E; ++e) {
    W1.assign(e, w.W1 + e * W1.K * W1.N);
    if (W2.E) W2.assign(e, w.W2 + e * W2.K * W2.N);
    if (W3.E) W3.assign(e, w.W3 + e * W3.K * W3.N);
  }
  ready = true;
}

void ExpertWeightsInt8::assign(const std::string& matrix, int64_t e, const float* src) {
  Int8Stack* st = matrix == "W1" ? &W1 : matrix == "W2" ? &W2 : matrix == "W3" ? &W3 : nullptr;
  MOE_REQUIRE(st && st->E > 0, "int8 weights: no expert matrix '", matrix, "' in this layer");
  MOE_REQUIRE(e >= 0 && e < st->E, matrix, ": expert index ", e, " out of range [0, ", st->E,
              ")");
  MOE_REQUIRE(src, matrix, ": null source");
  st->assign(e, src);
}

void experts_forward_int8(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                          const int64_t* off, const ExpertShape& s, ExpertWeightsInt8& wi,
                          ExpertScratchInt8& sc) {
  using Epi = Product::Epi;
  const int64_t R = off[s.E];
  if (R == 0) return;
  wi.prepare(w, s);
  const int64_t ldx = wi.W1.K4 * 4;
  uint8_t* xq = grown(sc.x, R * ldx);
  float* xs = grown(sc.x_scale, R);
  quantize_rows_u8(xq, ldx, xs, xg, s.d, R, s.d);
  std::vector<Product> ps;
  switch (s.kind) {
    case ExpertKind::linear_relu:
      add_products(ps, wi.W1, xq, xs, acts.out, w.b1, off, Epi::act_inplace, Activation::relu,
                   nullptr);
      run_products(ps);
      return;
    case ExpertKind::mlp:
      add_products(ps, wi.W1, xq, xs, acts.a1, w.b1, off, Epi::act_out, s.act, acts.hid);
      run_products(ps);
      break;
    case ExpertKind::swiglu:
    case ExpertKind::clamped_swiglu: {  // biases b1, b3 (clamped_swiglu) in the epilogues
      add_products(ps, wi.W1, xq, xs, acts.a1, w.b1, off, Epi::glu, s.act, acts.hid);
      for (Product& p : ps) {  // each expert's W1 product paired with its W3 product
        p.B2 = &wi.W3;
        p.C2 = acts.a3 + (p.C - acts.a1);
        p.bias2 = w.b3 ? w.b3 + p.e * s.F : nullptr;
        p.clamped = s.kind == ExpertKind::clamped_swiglu;
        p.alpha = s.alpha;
        p.limit = s.limit;
      }
      run_products(ps);
      break;
    }
  }
  const int64_t ldh = wi.W2.K4 * 4;
  uint8_t* hq = grown(sc.hid, R * ldh);
  float* hs = grown(sc.hid_scale, R);
  quantize_rows_u8(hq, ldh, hs, acts.hid, s.F, R, s.F);
  ps.clear();
  add_products(ps, wi.W2, hq, hs, acts.out, w.b2, off, Epi::none, s.act, nullptr);
  run_products(ps);
}

}  // namespace moe::detail
