#include "quant/kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/cpu.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "common/parallel.hpp"
#include "quant/kernels_impl.hpp"

namespace moe::detail {

namespace quant_impl {

namespace {
// The avx2 kernel's E4M3 conversion, on scalars: normal codes (magnitude << 20) + (120 << 23)
// as fp32 bits, subnormal ones magnitude · 2^-9, then the sign; NaN for S.1111.111.
bool e4m3_arithmetic_matches(const std::array<float, 256>& v) {
  for (uint32_t c = 0; c < 256; ++c) {
    const uint32_t mag = c & 0x7f, bits = (mag << 20) + (120u << 23);
    float f;
    std::memcpy(&f, &bits, 4);
    if (mag < 8) f = static_cast<float>(mag) * 0x1p-9f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= (c & 0x80u) << 24;
    std::memcpy(&f, &u, 4);
    const bool same = mag == 0x7f ? v[c] != v[c] : f == v[c] && std::signbit(f) == std::signbit(v[c]);
    if (!same) return false;
  }
  return true;
}

struct CodeTables {
  std::array<uint16_t, 128> bf16{};
  std::array<float, 256> f32{};
};
CodeTables make_tables(QuantFormatId id) {
  const QuantFormat& f = quant_format(id);
  const std::array<float, 256>& v = quant_code_values(id);
  CodeTables t;
  t.f32 = v;
  if (f.code_bits == 4) {
    for (int i = 0; i < 32; ++i)
      t.bf16[i] = f.linear_codes ? to_bf16(static_cast<float>(i - 16)) : i < 16 ? to_bf16(v[i]) : 0;
  } else {
    // Sign and magnitude: the widening reads the magnitude of code & 127 and ORs bit 7 into
    // the sign, which must be what the table says.
    for (int i = 0; i < 128; ++i) {
      t.bf16[i] = to_bf16(v[i]);
      MOE_ASSERT((to_bf16(v[i + 128]) ^ 0x8000u) == t.bf16[i]);
    }
    // The avx2 path converts E4M3 by arithmetic (kernels_avx2.cpp): the same numbers.
    MOE_ASSERT(id != QuantFormatId::fp8 || e4m3_arithmetic_matches(v));
  }
  return t;
}
const CodeTables& tables(QuantFormatId id) {
  static const CodeTables t[] = {make_tables(QuantFormatId::int4), make_tables(QuantFormatId::mxfp4),
                                 make_tables(QuantFormatId::fp8)};
  return t[static_cast<int>(id)];
}
}  // namespace

const uint16_t* bf16_code_table(QuantFormatId id) { return tables(id).bf16.data(); }
const float* f32_code_table(QuantFormatId id) { return tables(id).f32.data(); }
const float* e8m0_table() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> v{};
    for (int s = 0; s < 256; ++s) v[s] = e8m0_value(static_cast<uint8_t>(s));
    return v;
  }();
  return t.data();
}

}  // namespace quant_impl

QuantMethod quant_method_for(int64_t M, QuantFormatId format) {
  const int64_t most = quant_prefill_path(format) == QuantPath::avx512_vnni ? kQuantDecodeMaxRowsInt8
                                                                             : kQuantDecodeMaxRows;
  return M <= most ? QuantMethod::decode : QuantMethod::prefill;
}

// ---- rows ------------------------------------------------------------------------------------

namespace {
int64_t chunks_of(const QuantMatrix& W) { return (W.K + kQuantChunk - 1) / kQuantChunk; }
}  // namespace

namespace {
// Rows of a tiled matrix on the vnni decode: one int8 scale per G values.
bool tiled_rows(const QuantMatrix& W, QuantPath path, QuantMethod method) {
  return W.tiled && path == QuantPath::avx512_vnni && method == QuantMethod::decode;
}
}  // namespace

namespace {
// A 0|1 switch of the environment, 1 where unset: whether it is 0. Any other value is refused
// by name, `what` saying what the two mean. Read once through a static it initialises (a
// refusal is thrown again at every call).
bool switched_off(const char* name, const char* what) {
  const char* e = std::getenv(name);
  const std::string v = e ? e : "1";
  MOE_REQUIRE(v == "0" || v == "1", name, ": '", v, "' is not 0 or 1 (", what, ")");
  return v == "0";
}
}  // namespace

bool quant_tiling_wanted(const QuantMatrix& W) {
  static const bool off = switched_off(
      "MOE_QUANT_TILED",
      "1, the default: int4 and mxfp4 held in 16-column tiles where the decode path is "
      "avx512_vnni; 0: the column layout");
  return !off && W.fmt().code_bits == 4 && W.N % kQuantTileCols == 0 &&
         quant_decode_path(W.format) == QuantPath::avx512_vnni;
}

bool quant_vbmi() {
  static const bool off = switched_off(
      "MOE_VBMI",
      "1, the default: where the CPU has AVX512-VBMI, fp8's avx512_bf16 decode widens with "
      "vpermi2b and mxfp4's tiled decode shares exponents with vpermb; 0: the kernels of CPUs "
      "without it");
  return !off && cpu().has.avx512_vbmi;
}

int64_t quant_tiled_row_block(const QuantMatrix& W) {
  return W.format == QuantFormatId::mxfp4 && quant_vbmi()
             ? kQuantChunk
             : std::min<int64_t>(W.block_k, kQuantChunk);
}

int64_t quant_rows_bytes(const QuantMatrix& W, QuantPath path, QuantMethod method, int64_t M) {
  const int64_t chunks = chunks_of(W), ld = chunks * kQuantChunk, lanes = M * chunks * 16 * 4;
  if (tiled_rows(W, path, method)) return M * ld + 2 * M * (ld / quant_tiled_row_block(W)) * 4;
  if (method == QuantMethod::prefill)  // u8 rows and a scale a chunk, or bf16 rows
    return path == QuantPath::avx512_vnni ? M * ld + M * chunks * 4 : M * ld * 2;
  switch (quant_rows_type(path)) {
    case QuantRowsType::f32: return M * ld * 4;
    case QuantRowsType::s8: return M * ld + 2 * lanes;  // the lane scales and sums
    case QuantRowsType::bf16: break;
  }
  const bool sums = W.fmt().code_bits == 4 && W.zero_points;  // interleaved with zero points
  return M * ld * 2 + (sums ? lanes : 0);
}

float quant_s8_scale(const float* v, int64_t n) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::fabs(v[i]));
    nan = nan || v[i] != v[i];
  }
  return nan ? std::nanf("") : amax / 127.0f;
}

int8_t quant_s8(float v, float scale) {
  if (scale == 0.0f) return 0;
  const float r = std::nearbyint(v / scale);
  return static_cast<int8_t>(r < 127.0f ? (r > -127.0f ? r : -127.0f) : 127.0f);  // NaN: 127
}

namespace {
// Row x in the kernel's K order, zero-padded to n (act-order gathers; else a copy).
void gather_row(const QuantMatrix& W, const float* x, float* v, int64_t n) {
  if (W.act_order)
    for (int64_t k = 0; k < W.K; ++k) v[k] = x[W.perm[k]];
  else
    std::memcpy(v, x, static_cast<size_t>(W.K) * sizeof(float));
  std::fill(v + W.K, v + n, 0.0f);
}

// The interleaved order's sources (kernels_impl.hpp), as a table.
struct InterleaveTable {
  int src[kQuantChunk];
  constexpr explicit InterleaveTable(int bits) : src() {
    for (int p = 0; p < kQuantChunk; ++p)
      src[p] = bits == 4 ? quant_impl::interleaved_source(p) : quant_impl::interleaved8_source(p);
  }
};
constexpr InterleaveTable kInterleave(4), kInterleave8(8);

// A chunk of 128 int8 values t into d as s8 rows hold it: value 2e to byte e of the even half,
// 2e + 1 to byte 64 + e of the odd.
void even_then_odd(const int8_t* t, int8_t* d) {
  for (int e = 0; e < 64; ++e) {
    d[e] = t[2 * e];
    d[64 + e] = t[2 * e + 1];
  }
}

// s8 rows (QuantRows, kernels.hpp): per row and chunk, 128 int8 values (even then odd), then
// after all rows the lane scales and the lane sums. v: the row in kernel order.
void prepare_s8_row(const QuantMatrix& W, const QuantRows& r, const float* v, int64_t i,
                    int8_t* q, float* scales, float* sums) {
  const int64_t chunks = chunks_of(W);
  // mxfp4's codes enter doubled (2·E2M1 + 12 are integers): its row scales carry the 1/2.
  const float half = W.format == QuantFormatId::mxfp4 ? 0.5f : 1.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* vc = v + c * kQuantChunk;
    int8_t* d = q + i * r.ld + c * kQuantChunk;
    float* sc = scales + (i * chunks + c) * 16;
    float* su = sums + (i * chunks + c) * 16;
    int8_t t[kQuantChunk];
    for (int b = 0; b < 4; ++b) {
      const float s = quant_s8_scale(vc + 32 * b, 32);
      for (int k = 32 * b; k < 32 * b + 32; ++k) t[k] = quant_s8(vc[k], s);
      for (int l = 4 * b; l < 4 * b + 4; ++l) sc[l] = s * half;
    }
    even_then_odd(t, d);
    // Formats whose zero is one constant (int4 symmetric: 8; mxfp4's bytes: 12) take it
    // here, scaled: su = z · Σ · row scale, so the kernel's per-row step is one fmsub
    // (cvt(d) · rs − su) and one fma into the accumulator (kernels.hpp, QuantRows).
    for (int l = 0; l < 16; ++l) {
      int sum = 0;
      for (int k = 8 * l; k < 8 * l + 8; ++k) sum += t[k];
      su[l] = static_cast<float>(sum);
      if (!W.zero_points) su[l] *= quant_impl::s8_rows_fixed_zero(W) * sc[l];
    }
  }
}

// s8 rows of a tiled matrix (QuantRows::tiled): the values as prepare_s8_row places them (per
// chunk even then odd), quantized per G = quant_tiled_row_block values; scales (M, ld / G)
// and after them sums (M, ld / G): Σ of the block's int8 values, or z · Σ · scale for a fixed
// zero z (128 with mxfp4's shared exponents). v: the row in kernel order, zero-padded to ld.
void prepare_tiled_row(const QuantMatrix& W, const QuantRows& r, const float* v, int64_t i,
                       int8_t* q, float* scales) {
  const int64_t G = quant_tiled_row_block(W), blocks = r.ld / G;
  const float zero = r.shared_exponents ? 128.0f
                     : W.zero_points     ? 0.0f
                                         : quant_impl::s8_rows_fixed_zero(W);
  quant_impl::tiled_vnni_rows(v, r.ld, G, W.format == QuantFormatId::mxfp4 ? 0.5f : 1.0f, zero,
                              q + i * r.ld, scales + i * blocks, scales + r.M * blocks + i * blocks);
}
}  // namespace

QuantRows quant_prepare_rows(const QuantMatrix& W, QuantPath path, QuantMethod method,
                             const float* X, int64_t ldx, int64_t M, void* buf) {
  QuantRows r;
  r.path = path;
  r.method = method;
  r.M = M;
  const int64_t chunks = chunks_of(W), ld = chunks * kQuantChunk;
  r.ld = ld;
  r.data = buf;
  MOE_ASSERT(quant_path_supports(path, W.format));
  const QuantRowsType type =
      method == QuantMethod::prefill ? QuantRowsType::bf16 : quant_rows_type(path);
  r.interleaved = method == QuantMethod::decode &&
                  (((path == QuantPath::avx512_bf16 || path == QuantPath::avx512_vnni) &&
                    W.fmt().code_bits == 4) ||
                   (path == QuantPath::avx512_bf16 && W.fmt().code_bits == 8 && quant_vbmi()));
  r.tiled = tiled_rows(W, path, method);
  r.shared_exponents = r.tiled && W.format == QuantFormatId::mxfp4 && quant_vbmi();
  if (method == QuantMethod::prefill && path == QuantPath::avx512_vnni) {
    // u8 rows (M, ld) and their scales (M, chunks), each row on its own.
    auto* u8 = static_cast<uint8_t*>(buf);
    float* scales = reinterpret_cast<float*>(u8 + M * ld);
    r.scales = scales;
#pragma omp parallel for schedule(static) if (M * ld >= (int64_t{1} << 16))
    for (int64_t i = 0; i < M; ++i) {
      thread_local std::vector<float> v;
      if (v.size() < static_cast<size_t>(ld)) v.resize(static_cast<size_t>(ld));
      gather_row(W, X + i * ldx, v.data(), ld);
      quant_impl::prefill_vnni_rows(v.data(), ld, u8 + i * ld, scales + i * chunks);
    }
    return r;
  }
  // Each row once in kernel order (fp32 rows are that), then converted by plain loops.
  thread_local std::vector<float> row;
  if (row.size() < static_cast<size_t>(ld)) row.resize(static_cast<size_t>(ld));
  float* v = row.data();
  int8_t* q = static_cast<int8_t*>(buf);
  float* s8_scales = reinterpret_cast<float*>(q + M * ld);
  float* s8_sums = s8_scales + M * chunks * 16;
  for (int64_t i = 0; i < M; ++i) {
    const float* x = X + i * ldx;
    if (type == QuantRowsType::f32) {
      gather_row(W, x, static_cast<float*>(buf) + i * ld, ld);
      continue;
    }
    gather_row(W, x, v, ld);
    if (r.tiled) {
      prepare_tiled_row(W, r, v, i, q, s8_scales);
    } else if (type == QuantRowsType::s8) {
      prepare_s8_row(W, r, v, i, q, s8_scales, s8_sums);
    } else if (!r.interleaved) {
      uint16_t* d = static_cast<uint16_t*>(buf) + i * ld;
      for (int64_t k = 0; k < ld; ++k) d[k] = to_bf16(v[k]);
    } else {
      uint16_t* d = static_cast<uint16_t*>(buf) + i * ld;
      const int* src = W.fmt().code_bits == 4 ? kInterleave.src : kInterleave8.src;
      for (int64_t c = 0; c < ld; c += kQuantChunk)
        for (int p = 0; p < kQuantChunk; ++p) d[c + p] = to_bf16(v[c + src[p]]);
    }
  }
  if (r.tiled) {
    r.scales = s8_scales;
    r.sums = s8_scales + M * (ld / quant_tiled_row_block(W));
    return r;
  }
  if (type == QuantRowsType::s8) {
    r.scales = s8_scales;
    r.sums = s8_sums;
    return r;
  }
  if (r.interleaved && W.zero_points) {
    // Per chunk and fp32 lane t: the sum of the row values that vdpbf16ps adds into lane t
    // (words 2t and 2t + 1 of each of the chunk's four vectors), for z · Σ.
    float* sums = reinterpret_cast<float*>(static_cast<uint16_t*>(buf) + M * r.ld);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < chunks; ++c)
        for (int t = 0; t < 16; ++t) {
          const uint16_t* a = static_cast<const uint16_t*>(buf) + i * r.ld + c * kQuantChunk;
          float sum = 0.0f;
          for (int v = 0; v < 4; ++v) sum += from_bf16(a[32 * v + 2 * t]) + from_bf16(a[32 * v + 2 * t + 1]);
          sums[(i * chunks + c) * 16 + t] = sum;
        }
    r.sums = sums;
  }
  return r;
}

// ---- decode ----------------------------------------------------------------------------------

void quant_decode_serial(const QuantMatrix& W, const QuantRows& rows, int64_t n0, int64_t n,
                         float* C, int64_t ldc) {
  MOE_ASSERT(n0 >= 0 && n0 + n <= W.N && rows.method == QuantMethod::decode &&
             rows.ld == chunks_of(W) * kQuantChunk);
  if (n <= 0) return;
  if (W.tiled && !rows.tiled) {  // another path: its kernel on these columns in column layout
    thread_local QuantStorage cols;
    quant_decode_serial(quant_untiled(W, n0, n, cols), rows, 0, n, C, ldc);
    return;
  }
  if (rows.tiled) {  // rows in passes of up to 8 (the kernel's accumulators)
    MOE_ASSERT(W.tiled);
    const int64_t blocks = (rows.M + 7) / 8;
    for (int64_t bi = 0, i0 = 0; bi < blocks; ++bi) {
      const int64_t m = (rows.M - i0) / (blocks - bi);
      quant_impl::decode_avx512_vnni_tiled(W, rows, i0, m, n0, n, C + i0 * ldc, ldc);
      i0 += m;
    }
    return;
  }
  // Row blocks as even as possible (a row's bits do not depend on its block): on
  // avx512_bf16 as many rows (4 to 16) as keep a pass's rows in a 32 KiB L1 (each column
  // reads all of them: 16 rows of K 2048 from L2 took 2.3x as long as two passes of 8, 1048
  // against 449 us), 8 on the fp32 paths.
  const int64_t row_bytes = rows.path == QuantPath::avx512_bf16   ? 2 * rows.ld
                            : rows.path == QuantPath::avx512_vnni ? rows.ld + rows.ld
                                                                   : 0;
  const int64_t most =
      row_bytes ? std::clamp<int64_t>(kQuantDecodeRowBytes / row_bytes, 4, 16) : 8;
  const int64_t blocks = (rows.M + most - 1) / most;
  for (int64_t bi = 0, i0 = 0; bi < blocks; ++bi) {
    const int64_t m = (rows.M - i0) / (blocks - bi);
    float* c = C + i0 * ldc;
    switch (rows.path) {
      case QuantPath::avx512_bf16:
        quant_impl::decode_avx512_bf16(W, rows, i0, m, n0, n, c, ldc);
        break;
      case QuantPath::avx512_vnni:
        quant_impl::decode_avx512_vnni(W, rows, i0, m, n0, n, c, ldc);
        break;
      case QuantPath::avx512:
        quant_impl::decode_avx512(W, static_cast<const float*>(rows.data) + i0 * rows.ld, rows.ld,
                                  m, n0, n, c, ldc);
        break;
      case QuantPath::avx2:
        quant_impl::decode_avx2(W, static_cast<const float*>(rows.data) + i0 * rows.ld, rows.ld, m,
                                n0, n, c, ldc);
        break;
    }
    i0 += m;
  }
}

// ---- prefill ---------------------------------------------------------------------------------

int64_t quant_prefill_workspace_size(const QuantMatrix& W) {
  const int64_t bf16 = packed_bf16_size(std::min(W.K, kQuantPanelK), kPanelCols);
  return W.fmt().code_bits == 4 ? std::max(bf16, (quant_impl::prefill_vnni_workspace_bytes(W) + 1) / 2)
                                : bf16;
}

namespace {
// The portable widening (path avx2, and the tests' twin of the AVX-512 one).
void widen_panel_portable(const QuantMatrix& W, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                          uint16_t* panel) {
  const QuantFormat& f = W.fmt();
  const std::array<float, 256>& values = quant_code_values(W.format);
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t col = j0 + j;
    const uint8_t* codes = W.codes + col * W.code_stride;
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t r = k0 + k, b = r / W.block_k;
      const int code = f.code_bits == 4 ? (r % 2 ? codes[r / 2] >> 4 : codes[r / 2] & 15) : codes[r];
      float v = values[code];
      if (f.linear_codes) v -= static_cast<float>(W.zero_points ? W.zeros[col * W.zero_stride + b] : 8);
      const float s = quant_scale_value(f.scale, W.scales, (col / f.block_n) * W.scale_stride + b);
      panel[packed_bf16_index(kc, k, j)] = to_bf16(v * s);
    }
    if (kc % 2) panel[packed_bf16_index(kc, kc, j)] = 0;
  }
  for (int64_t j = nc; j < kPanelCols; ++j)
    for (int64_t k = 0; k < (kc + 1) / 2 * 2; ++k) panel[packed_bf16_index(kc, k, j)] = 0;
}
}  // namespace

void quant_widen_panel(const QuantMatrix& W, QuantPath widen, int64_t j0, int64_t nc, int64_t k0,
                       int64_t kc, uint16_t* panel) {
  MOE_ASSERT(k0 % 32 == 0 && k0 + kc <= W.K && nc >= 0 && nc <= kPanelCols && j0 + nc <= W.N);
  // The AVX-512 widening writes 16 columns of a row pair as 64 contiguous bytes.
  MOE_ASSERT(packed_bf16_index(kc, 0, 1) == 2 && packed_bf16_index(kc, 1, 0) == 1);
  if (widen == QuantPath::avx2)
    widen_panel_portable(W, j0, nc, k0, kc, panel);
  else
    quant_impl::widen_panel_avx512(W, j0, nc, k0, kc, panel);
  // The padding rows after the last pair (packed_bf16_size knows how far K is padded).
  const int64_t pairs = (kc + 1) / 2, padded = packed_bf16_size(kc, kPanelCols) / kPanelCols;
  for (int64_t k = 2 * pairs; k < padded; k += 2)
    std::memset(panel + packed_bf16_index(kc, k, 0), 0, sizeof(uint16_t) * 2 * kPanelCols);
}

namespace quant_impl {
QuantPanel next_panel(const QuantMatrix& W, int64_t n0, int64_t n, int64_t j, int64_t k0,
                      QuantNext next) {
  const QuantMatrix* to = &W;
  // Without a `next`, W's columns past this call's are taken to come next.
  int64_t col = n0 + j, k = k0 + kQuantPanelK, end = next.W ? n0 + n : W.N;
  if (k >= W.K) {  // this column tile's last K panel: the next 64 columns, or the caller's next
    k = 0;
    col += kPanelCols;
    if (col >= end && next.W) {
      to = next.W;
      col = next.j;
      end = next.W->N;
    }
  }
  return {to, col, std::min(kPanelCols, std::min(end, to->N) - col), k,
          std::min(kQuantPanelK, to->K - k)};
}
}  // namespace quant_impl

void quant_prefill_serial(const QuantMatrix& W, const QuantRows& rows, QuantPath widen,
                          int64_t n0, int64_t n, float* C, int64_t ldc, uint16_t* ws,
                          QuantNext next) {
  MOE_ASSERT(rows.method == QuantMethod::prefill && n0 >= 0 && n0 + n <= W.N);
  if (W.tiled) {  // the panels widen from these columns in column layout (a copy of n columns)
    if (n <= 0) return;
    thread_local QuantStorage cols;
    const QuantMatrix u = quant_untiled(W, n0, n, cols);
    return quant_prefill_serial(u, rows, widen, 0, n, C, ldc, ws);
  }
  if (rows.path == QuantPath::avx512_vnni)
    return quant_impl::prefill_vnni_serial(W, rows, n0, n, C, ldc,
                                           reinterpret_cast<unsigned char*>(ws), next);
  const auto* A = static_cast<const uint16_t*>(rows.data);
  // Rows in blocks, the next panel's lines asked for between them (quant_impl::prefetch_panel);
  // a row's sums do not depend on its block.
  constexpr int64_t kRowBlock = 16;
  const int64_t blocks = (rows.M + kRowBlock - 1) / kRowBlock;
  for (int64_t j = 0; j < n; j += kPanelCols) {
    const int64_t nc = std::min(kPanelCols, n - j);
    for (int64_t k0 = 0; k0 < W.K; k0 += kQuantPanelK) {
      const int64_t kc = std::min(kQuantPanelK, W.K - k0);
      quant_widen_panel(W, widen, n0 + j, nc, k0, kc, ws);
      const quant_impl::QuantPanel after = quant_impl::next_panel(W, n0, n, j, k0, next);
      for (int64_t b = 0; b < blocks; ++b) {
        quant_impl::prefetch_panel(after, b, blocks);
        const int64_t i0 = b * kRowBlock, m = std::min(kRowBlock, rows.M - i0);
        gemm_bf16_packed_serial(m, 0, nc, kc, A + i0 * rows.ld + k0, rows.ld, ws,
                                k0 > 0 ? 1.0f : 0.0f, C + i0 * ldc + j, ldc);
      }
    }
  }
}

// ---- the parallel driver ---------------------------------------------------------------------

namespace {
// Whether two matrices take their rows in the same K order (so one preparation serves both).
bool same_rows(const QuantMatrix& a, const QuantMatrix& b) {
  if (a.K != b.K || a.act_order != b.act_order) return false;
  return !a.act_order || a.perm == b.perm ||
         std::equal(a.perm, a.perm + a.K, b.perm);
}
}  // namespace

bool quant_rows_shared(const QuantMatrix& a, const QuantMatrix& b) {
  return same_rows(a, b) && a.N == b.N && a.format == b.format && a.block_k == b.block_k &&
         a.tiled == b.tiled;
}

void quant_matmul_grouped(const std::vector<QuantProduct>& ps, QuantGroupWorkspace& ws) {
  const int64_t np = static_cast<int64_t>(ps.size());
  if (np == 0) return;
  const int threads = omp_get_max_threads();
  // Each product's path and method, its rows' place, the panel the largest one needs.
  ws.offsets.assign(static_cast<size_t>(np + 1), 0);
  ws.prepared.resize(static_cast<size_t>(np));
  int64_t panel = 0;
  bool decode = true;  // every product decodes
  for (int64_t p = 0; p < np; ++p) {
    const QuantProduct& q = ps[static_cast<size_t>(p)];
    MOE_ASSERT(q.count >= 1 && q.count <= 2 && q.M > 0 &&
               (q.count == 1 || quant_rows_shared(*q.W[0], *q.W[1])));
    for (int m = 0; m < q.count; ++m) validate(*q.W[m]);
    QuantRows& r = ws.prepared[static_cast<size_t>(p)];
    const QuantFormatId f = q.W[0]->format;
    r.method = q.pinned ? q.method : quant_method_for(q.M, f);
    r.path = q.pinned                           ? q.path
             : r.method == QuantMethod::decode ? quant_decode_path(f)
                                                : quant_prefill_path(f);
    decode = decode && r.method == QuantMethod::decode;
    ws.offsets[static_cast<size_t>(p + 1)] =
        ws.offsets[static_cast<size_t>(p)] +
        (quant_rows_bytes(*q.W[0], r.path, r.method, q.M) + 63) / 64 * 64;
    panel = std::max(panel, (quant_prefill_workspace_size(*q.W[0]) + 31) / 32 * 32);  // 64 B
  }
  if (ws.rows.size() < static_cast<size_t>(ws.offsets.back()))
    ws.rows.resize(static_cast<size_t>(ws.offsets.back()));
  if (ws.panels.size() < static_cast<size_t>(panel * threads))
    ws.panels.resize(static_cast<size_t>(panel * threads));
  const auto prepare = [&](int64_t p) {
    const QuantProduct& q = ps[static_cast<size_t>(p)];
    QuantRows& r = ws.prepared[static_cast<size_t>(p)];
    r = quant_prepare_rows(*q.W[0], r.path, r.method, q.X, q.ldx, q.M,
                           ws.rows.data() + ws.offsets[static_cast<size_t>(p)]);
  };
  // Many products: one thread each (its rows serially); few: one after another, each spread
  // over the threads by rows (quant_prepare_rows).
  if (np >= 2 * threads) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t p = 0; p < np; ++p) prepare(p);
  } else {
    for (int64_t p = 0; p < np; ++p) prepare(p);
  }
  ws.tasks.clear();
  for (int64_t p = 0; p < np; ++p) {
    const int64_t tiles = (ps[static_cast<size_t>(p)].W[0]->N + kQuantTileN - 1) / kQuantTileN;
    for (int64_t t = 0; t < tiles; ++t)
      ws.tasks.emplace_back(static_cast<int32_t>(p), static_cast<int32_t>(t));
  }
  const int64_t nt = static_cast<int64_t>(ws.tasks.size());
  const auto task = [&](int64_t i) {
    const QuantProduct& q = ps[static_cast<size_t>(ws.tasks[static_cast<size_t>(i)].first)];
    const QuantRows& rows = ws.prepared[static_cast<size_t>(ws.tasks[static_cast<size_t>(i)].first)];
    const int64_t n0 = ws.tasks[static_cast<size_t>(i)].second * kQuantTileN;
    const int64_t n = std::min(kQuantTileN, q.W[0]->N - n0);
    for (int m = 0; m < q.count; ++m) {
      if (rows.method == QuantMethod::decode) {
        quant_decode_serial(*q.W[m], rows, n0, n, q.C[m] + n0, q.ldc);
        continue;
      }
      // Then the product's next matrix on the same columns, or the next task's (a thread's
      // tasks are consecutive).
      QuantNext next;
      if (m + 1 < q.count) {
        next = {q.W[m + 1], n0};
      } else if (i + 1 < nt) {
        const auto& [p1, t1] = ws.tasks[static_cast<size_t>(i + 1)];
        next = {ps[static_cast<size_t>(p1)].W[0], int64_t{t1} * kQuantTileN};
      }
      quant_prefill_serial(*q.W[m], rows, rows.path, n0, n, q.C[m] + n0, q.ldc,
                           ws.panels.data() + omp_get_thread_num() * panel, next);
    }
    if (q.epilogue) q.epilogue(q.ctx, n0, n);
  };
  // A thread's tasks are consecutive: decode streams each share in order, and the panel a
  // prefill asks for ahead (the next 64 columns of its matrix) is mostly its own next one.
  // Decode, bound by memory, lets a thread done early take the others' last tasks (a
  // Qwen3-30B-A3B int4 decode step 4-8% faster on a shared VM); prefill keeps the static
  // shares (stealing measured no faster there: docs/quant.md, "Workspace and threads").
  if (decode) {
    parallel_tasks_stealing(nt, ws.shares, task);
  } else {
#pragma omp parallel for schedule(static) if (nt > 1)
    for (int64_t i = 0; i < nt; ++i) task(i);
  }
}

void quant_matmul(const QuantMatrix& W, QuantPath path, QuantMethod method, const float* X,
                  int64_t ldx, int64_t M, float* C, int64_t ldc, QuantGroupWorkspace& ws) {
  MOE_REQUIRE(quant_path_allowed(path), "quant_matmul: path ", quant_path_name(path),
              " is not allowed on this CPU (MOE_MAX_ISA or its features)");
  MOE_REQUIRE(quant_path_supports(path, W.format), "quant_matmul: path ", quant_path_name(path),
              " does not read ", W.fmt().name);
  validate(W);
  if (M <= 0) return;
  QuantProduct q;
  q.W[0] = &W;
  q.C[0] = C;
  q.X = X;
  q.ldx = ldx;
  q.M = M;
  q.ldc = ldc;
  q.pinned = true;
  q.path = path;
  q.method = method;
  quant_matmul_grouped({q}, ws);
}

std::string quant_kernel_name(const QuantMatrix& W, QuantPath path) {
  std::string name = W.fmt().name;
  switch (W.format) {
    case QuantFormatId::int4:
      name += "_g" + std::to_string(W.block_k) + (W.zero_points ? "_zp" : "_sym");
      if (W.act_order) name += "_act";
      break;
    case QuantFormatId::mxfp4: name += "_e8m0x32"; break;
    case QuantFormatId::fp8: name += "_e4m3_b128x128"; break;
  }
  name += ":";
  name += quant_path_name(path);
  const bool eight = W.fmt().code_bits == 8;
  switch (path) {
    case QuantPath::avx512_vnni: {
      name += W.format == QuantFormatId::mxfp4 ? " (vpshufb widening, int8 rows, vpdpbusd"
                                               : " (nibbles as bytes, int8 rows, vpdpbusd";
      QuantMatrix tile16 = W;  // the layer's matrices of N a multiple of 16
      tile16.N = kQuantTileCols;
      const bool tiles = quant_tiling_wanted(tile16);
      name += !tiles ? ")"
              : W.format == QuantFormatId::mxfp4 && quant_vbmi()
                  ? "; 16-column tiles where N is a multiple of 16, there exponents shared per "
                    "128 values with vpermb)"
                  : "; 16-column tiles where N is a multiple of 16)";
      break;
    }
    case QuantPath::avx512_bf16:
      name += !eight           ? " (vpshufb widening, vdpbf16ps)"
              : quant_vbmi() ? " (vpermi2b widening at decode, vpermi2w into panels, vdpbf16ps)"
                                 : " (vpermi2w widening, vdpbf16ps)";
      break;
    case QuantPath::avx512:
      name += eight ? " (vpermi2w widening, fp32 vfmadd)" : " (vpermw widening, fp32 vfmadd)";
      break;
    case QuantPath::avx2:
      name += eight ? " (E4M3 by arithmetic, fp32 vfmadd)" : " (vpsrlvd widening, fp32 vfmadd)";
      break;
  }
  return name;
}

std::string quant_prefill_kernel_name(const QuantMatrix& W, QuantPath path) {
  const std::string name = quant_kernel_name(W, path);
  if (path == QuantPath::avx512_vnni)
    return name.substr(0, name.find(' ')) + " (int8 rows per 128 values, int8 panels, vpdpbusd)";
  return name + " widening into bf16 panels for " + gemm_bf16_packed_impl();
}

}  // namespace moe::detail
