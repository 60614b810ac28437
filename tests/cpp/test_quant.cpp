// Low-bit weights (SPEC §6 "int4", "mxfp4", "fp8"; src/quant/): every kernel path the CPU
// allows against the float64 twin on the same stored bytes (rows rounded as the path rounds
// them), awkward shapes, bit-identical results across thread counts and tilings, the prefill
// panels, libmoe's int4 quantizer's error, and the GPTQ / AWQ repacking against their published
// definitions. tests/python/test_quant_formats.py holds the same bytes to NumPy / torch /
// transformers readings of each format (through QuantOracle.WriteCases).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/bf16.hpp"
#include "common/cpu.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "moe/error.hpp"
#include "quant/fp8.hpp"
#include "quant/int4.hpp"
#include "quant/int4_import.hpp"
#include "quant/kernels.hpp"
#include "quant/kernels_impl.hpp"
#include "experts/lowbit.hpp"
#include "quant/mxfp4.hpp"
#include "test_layer_util.hpp"

namespace {

using namespace moe::detail;
using moe_test::Rng;

const QuantPath kPaths[] = {QuantPath::avx2, QuantPath::avx512, QuantPath::avx512_bf16,
                            QuantPath::avx512_vnni};
// The paths this CPU allows that decode W's format.
bool runs(QuantPath p, const QuantMatrix& W) {
  return quant_path_allowed(p) && quant_path_supports(p, W.format);
}

// ---- weights of every format, random over all their codes ----------------------------------

struct Variant {
  QuantFormatId format;
  int64_t group;  // int4
  bool zero_points;
  std::string label() const {
    if (format != QuantFormatId::int4) return quant_format(format).name;
    return "int4_g" + std::to_string(group) + (zero_points ? "_zp" : "_sym");
  }
};
const Variant kVariants[] = {
    {QuantFormatId::int4, 32, false}, {QuantFormatId::int4, 64, true},
    {QuantFormatId::int4, 128, false}, {QuantFormatId::int4, 128, true},
    {QuantFormatId::mxfp4, 0, false}, {QuantFormatId::fp8, 0, false},
};

struct Held {
  Int4Kernel::Weights i4;
  Mxfp4Kernel::Weights mx;
  Fp8Kernel::Weights f8;
  QuantMatrix view;
};

// Codes uniform over all codes (fp8: but its two NaNs), scales so that outputs are O(1).
Held random_weights(const Variant& v, int64_t K, int64_t N, Rng& rng) {
  Held h;
  const double amp = 1.0 / std::sqrt(static_cast<double>(K));
  switch (v.format) {
    case QuantFormatId::int4: {
      h.i4.resize(K, N, v.group, v.zero_points);
      for (auto& b : h.i4.codes) b = static_cast<uint8_t>(rng.below(256));
      for (auto& s : h.i4.scales)
        s = f32_to_f16(static_cast<float>((rng.uniform() < 0.2 ? -1 : 1) * amp * (0.1 + 0.2 * rng.uniform())));
      for (auto& z : h.i4.zeros) z = static_cast<uint8_t>(rng.below(16));
      h.view = h.i4.view();
      break;
    }
    case QuantFormatId::mxfp4: {
      h.mx.resize(K, N);
      for (auto& b : h.mx.blocks) b = static_cast<uint8_t>(rng.below(256));
      for (auto& s : h.mx.scales) s = static_cast<uint8_t>(127 - 2 - rng.below(4) - static_cast<int64_t>(std::log2(std::sqrt(K))));
      h.view = h.mx.view();
      break;
    }
    case QuantFormatId::fp8: {
      h.f8.resize(K, N);
      for (auto& b : h.f8.weight) {
        do b = static_cast<uint8_t>(rng.below(256));
        while ((b & 0x7f) == 0x7f);
      }
      for (auto& s : h.f8.scale_inv) s = static_cast<float>(amp * (0.002 + 0.01 * rng.uniform()));
      h.view = h.f8.view();
      break;
    }
  }
  return h;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Whether the VBMI decode kernels should run (kernels.hpp's quant_vbmi, from the CPU and
// MOE_VBMI as docs/quant.md states it; ctest's quant.no_vbmi sets MOE_VBMI=0).
bool vbmi_expected() {
  const char* env = std::getenv("MOE_VBMI");
  return cpu().has.avx512_vbmi && !(env && std::string(env) == "0");
}

// Values per int8 row scale of a tiled decode: 128 for mxfp4's shared exponents (VBMI), else
// min(block_k, 128).
int64_t tiled_rows_block(const QuantMatrix& W) {
  return W.format == QuantFormatId::mxfp4 && vbmi_expected() ? 128
                                                             : std::min<int64_t>(W.block_k, 128);
}

// The rows (M, K) as the path and method round them, in W's own K order: bf16, fp32, or int8
// per 32 (decode; a tiled matrix's: per tiled_rows_block) or 128 (prefill) values of the
// kernel's K order (act-order gathers them) times their scale. Prefill rows are bf16 except on avx512_vnni.
std::vector<double> rounded_rows(const QuantMatrix& W, const std::vector<float>& X, QuantPath p,
                                 QuantMethod m = QuantMethod::decode) {
  const int64_t K = W.K, M = static_cast<int64_t>(X.size()) / K;
  const bool s8 = quant_rows_type(p) == QuantRowsType::s8;
  const bool bf16 = m == QuantMethod::prefill ? !s8 : quant_rows_bf16(p);
  // int8 per 128 (prefill), per tiled_rows_block (decode of a tiled matrix), else per 32
  const int64_t block = m == QuantMethod::prefill ? 128
                        : W.tiled                 ? tiled_rows_block(W)
                                                  : 32;
  std::vector<double> r(X.size());
  for (int64_t i = 0; i < M; ++i) {
    const float* x = X.data() + i * K;
    if (!s8) {
      for (int64_t k = 0; k < K; ++k) r[i * K + k] = bf16 ? round_bf16(x[k]) : x[k];
      continue;
    }
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      float v[128] = {};
      const int64_t n = std::min<int64_t>(block, K - k0);
      auto src = [&](int64_t k) { return W.act_order ? W.perm[k] : k; };
      for (int64_t t = 0; t < n; ++t) v[t] = x[src(k0 + t)];
      const float s = quant_s8_scale(v, block);
      for (int64_t t = 0; t < n; ++t) r[i * K + src(k0 + t)] = static_cast<double>(quant_s8(v[t], s)) * s;
    }
  }
  return r;
}

std::vector<float> run(const QuantMatrix& W, QuantPath p, QuantMethod m, const std::vector<float>& X,
                       int64_t M) {
  QuantGroupWorkspace ws;
  std::vector<float> C(static_cast<size_t>(M * W.N), -7.0f);
  quant_matmul(W, p, m, X.data(), W.K, M, C.data(), W.N, ws);
  return C;
}

std::vector<double> twin(const QuantMatrix& W, const std::vector<double>& A, int64_t M) {
  std::vector<double> C(static_cast<size_t>(M * W.N));
  quant_matmul_ref(W, A.data(), M, C.data());
  return C;
}

// max |got − want| / max |want| ≤ tol, nothing non-finite, want not mostly zeros.
void expect_rel(const std::vector<float>& got, const std::vector<double>& want, double tol,
                const std::string& what) {
  SCOPED_TRACE(what);
  const double e = moe_test::rel_max_err(got, want);
  EXPECT_LE(e, tol);
  int64_t nonzero = 0;
  for (double w : want) nonzero += w != 0.0;
  EXPECT_GE(nonzero, static_cast<int64_t>(want.size() * 9 / 10)) << "zero-trust";
}

struct Shape {
  int64_t K, N;
};
// K: one sub-block, off the 32-value sub-block, off the int4 group, beyond one prefill panel;
// N: one column, off the 64-column tile and the fp8 128-column scale block.
const Shape kShapes[] = {{32, 1}, {100, 7}, {300, 130}, {544, 65}, {2100, 70}};

}  // namespace

// ---- the table and its values ------------------------------------------------------------------

TEST(QuantFormats, TableNamesAndCodeValues) {
  EXPECT_STREQ(quant_format(QuantFormatId::int4).name, "int4");
  EXPECT_STREQ(quant_format(QuantFormatId::mxfp4).name, "mxfp4");
  EXPECT_STREQ(quant_format(QuantFormatId::fp8).name, "fp8");
  for (int i = 0; i < 3; ++i) EXPECT_EQ(static_cast<int>(kQuantFormats[i].id), i);
  // E2M1, as transformers' FP4_VALUES lists it.
  const float e2m1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0f, -0.5, -1, -1.5, -2, -3, -4, -6};
  for (int c = 0; c < 16; ++c) EXPECT_EQ(quant_code_values(QuantFormatId::mxfp4)[c], e2m1[c]) << c;
  const auto& f8 = quant_code_values(QuantFormatId::fp8);
  EXPECT_EQ(f8[0x7e], 448.0f);
  EXPECT_EQ(f8[0xfe], -448.0f);
  EXPECT_EQ(f8[0x01], std::ldexp(1.0f, -9));  // the smallest subnormal
  EXPECT_EQ(f8[0x08], std::ldexp(1.0f, -6));  // the smallest normal
  EXPECT_EQ(f8[0x38], 1.0f);
  EXPECT_TRUE(std::isnan(f8[0x7f]) && std::isnan(f8[0xff]));
  EXPECT_EQ(e8m0_value(127), 1.0f);
  EXPECT_EQ(e8m0_value(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(e8m0_value(254), std::ldexp(1.0f, 127));
  EXPECT_TRUE(std::isnan(e8m0_value(255)));
}

TEST(QuantFormats, HalfConversionsRoundTripAndRoundToNearestEven) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);   // tie → even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie → even (up)
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie with 0 → even
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -26)), 0x0001);
}

TEST(QuantFormats, KernelNamesSayFormatAndPath) {
  Rng rng(1);
  for (const Variant& v : kVariants) {
    const Held h = random_weights(v, 64, 8, rng);
    const std::string name = quant_kernel_name(h.view, QuantPath::avx512_bf16);
    EXPECT_EQ(name.rfind(quant_format(v.format).name, 0), 0u) << name;
    EXPECT_NE(name.find(":avx512_bf16"), std::string::npos) << name;
  }
  RecordProperty("best_path", quant_path_name(quant_best_path()));
  Int4Kernel::Weights w;
  w.resize(128, 1, 128, false);
  RecordProperty("int4", Int4Kernel::name(w, quant_decode_path(QuantFormatId::int4)));
  RecordProperty("mxfp4", Mxfp4Kernel::name(quant_decode_path(QuantFormatId::mxfp4)));
  RecordProperty("fp8", Fp8Kernel::name(quant_decode_path(QuantFormatId::fp8)));
}

// ---- decode ----------------------------------------------------------------------------------

TEST(QuantDecode, EveryPathMatchesTheTwin) {
  Rng rng(7);
  int checked = 0;
  // What each path's rounding of the rows costs against the exact rows (reported).
  double worst_exact[4] = {};
  for (const Variant& v : kVariants)
    for (const Shape& s : kShapes) {
      const Held h = random_weights(v, s.K, s.N, rng);
      for (const int64_t M : {1, 2, 3, 4, 5, 7, 8, 9, 16}) {
        const std::vector<float> X = rng.vec(M * s.K, 1.0);
        const std::vector<double> exact = M * s.N >= 64 ? twin(h.view, to_double(X), M)
                                                        : std::vector<double>();
        for (const QuantPath p : kPaths) {
          if (!runs(p, h.view)) continue;
          const std::vector<float> C = run(h.view, p, QuantMethod::decode, X, M);
          expect_rel(C, twin(h.view, rounded_rows(h.view, X, p), M), 1e-3,
                     v.label() + " K " + std::to_string(s.K) + " N " + std::to_string(s.N) +
                         " M " + std::to_string(M) + " " + quant_path_name(p));
          if (!exact.empty()) {
            double& w = worst_exact[static_cast<int>(p)];
            w = std::max(w, moe_test::rel_max_err(C, exact));
          }
          ++checked;
        }
      }
    }
  RecordProperty("cases", checked);
  for (const QuantPath p : kPaths)
    if (quant_path_allowed(p))
      RecordProperty(std::string("worst_vs_exact_rows_") + quant_path_name(p),
                     std::to_string(worst_exact[static_cast<int>(p)]));
}

// fp8's decode on avx512_bf16 widens with vpermi2b where the CPU has AVX512-VBMI (unless
// MOE_VBMI=0, which ctest's quant.no_vbmi entry sets to run the other widening): its
// rows are then bf16 in interleaved8_source's order, a permutation of each chunk. Both
// widenings are held to the twin by EveryPathMatchesTheTwin.
TEST(QuantDecode, Fp8RowsFollowTheWideningTheCpuTakes) {
  Rng rng(41);
  const Held h = random_weights({QuantFormatId::fp8, 128, false}, 300, 40, rng);
  if (!runs(QuantPath::avx512_bf16, h.view)) GTEST_SKIP() << "no AVX512-BF16 path here";
  const bool want = vbmi_expected();
  EXPECT_EQ(quant_vbmi(), want);
  const int64_t M = 3;
  const std::vector<float> X = rng.vec(M * 300, 1.0);
  std::vector<unsigned char> buf(static_cast<size_t>(
      quant_rows_bytes(h.view, QuantPath::avx512_bf16, QuantMethod::decode, M)));
  const QuantRows r = quant_prepare_rows(h.view, QuantPath::avx512_bf16, QuantMethod::decode,
                                         X.data(), 300, M, buf.data());
  EXPECT_EQ(r.interleaved, want);
  std::vector<int> seen(128, 0);
  for (int p = 0; p < 128; ++p) ++seen[static_cast<size_t>(quant_impl::interleaved8_source(p))];
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), 128);  // a permutation
  const auto* d = static_cast<const uint16_t*>(r.data);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < r.ld; ++k) {
      const int64_t c = k / 128, p = k % 128;
      const int64_t src = c * 128 + (want ? quant_impl::interleaved8_source(static_cast<int>(p)) : p);
      const uint16_t expect = src < 300 ? to_bf16(X[static_cast<size_t>(i * 300 + src)]) : 0;
      ASSERT_EQ(d[i * r.ld + k], expect) << "row " << i << " position " << k;
    }
}

TEST(QuantDecode, ZeroRowsGiveZerosAndNoRowsWriteNothing) {
  Rng rng(3);
  for (const Variant& v : kVariants) {
    const Held h = random_weights(v, 200, 70, rng);
    std::vector<float> X = rng.vec(3 * 200, 1.0);
    std::fill(X.begin() + 200, X.begin() + 400, 0.0f);
    for (const QuantPath p : kPaths) {
      if (!runs(p, h.view)) continue;
      for (const QuantMethod m : {QuantMethod::decode, QuantMethod::prefill}) {
        const std::vector<float> C = run(h.view, p, m, X, 3);
        for (int64_t j = 0; j < 70; ++j) EXPECT_EQ(C[70 + j], 0.0f) << v.label();
        QuantGroupWorkspace ws;
        std::vector<float> none(5, 3.0f);
        quant_matmul(h.view, p, m, X.data(), 200, 0, none.data(), 70, ws);
        EXPECT_EQ(none, std::vector<float>(5, 3.0f));
      }
    }
  }
}

// quant_rows_bytes is what quant_prepare_rows writes on each path and method: the bytes past it
// stay as they were, and it is no more than the rows themselves and their per-chunk lanes.
TEST(QuantDecode, PreparedRowsFitTheirSizeExactly) {
  Rng rng(5);
  for (const Variant& v : kVariants) {
    const Held h = random_weights(v, 300, 20, rng);
    for (const int64_t M : {int64_t{1}, int64_t{7}}) {
      const std::vector<float> X = rng.vec(M * 300, 1.0);
      for (const QuantPath p : kPaths) {
        if (!runs(p, h.view)) continue;
        for (const QuantMethod m : {QuantMethod::decode, QuantMethod::prefill}) {
          const int64_t bytes = quant_rows_bytes(h.view, p, m, M);
          const int64_t ld = (300 + kQuantChunk - 1) / kQuantChunk * kQuantChunk;
          EXPECT_LE(bytes, M * ld * 4 + M * ld / kQuantChunk * 2 * 16 * 4) << v.label();
          std::vector<unsigned char> buf(static_cast<size_t>(bytes + 256), 0xa5);
          quant_prepare_rows(h.view, p, m, X.data(), 300, M, buf.data());
          for (int64_t i = bytes; i < bytes + 256; ++i)
            ASSERT_EQ(buf[static_cast<size_t>(i)], 0xa5)
                << v.label() << " " << quant_path_name(p) << " M " << M << " wrote byte " << i;
        }
      }
    }
  }
}

TEST(QuantDecode, BitsDependOnNeitherThreadsNorTilingNorRowCount) {
  Rng rng(11);
  for (const Variant& v : kVariants) {
    const Held h = random_weights(v, 300, 200, rng);
    const int64_t M = 16;
    const std::vector<float> X = rng.vec(M * 300, 1.0);
    for (const QuantPath p : kPaths) {
      if (!runs(p, h.view)) continue;
      for (const QuantMethod method : {QuantMethod::decode, QuantMethod::prefill}) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(1);
        const std::vector<float> one = run(h.view, p, method, X, M);
        for (int t : {2, 3}) {
          omp_set_num_threads(t);
          const std::vector<float> many = run(h.view, p, method, X, M);
          EXPECT_EQ(std::memcmp(one.data(), many.data(), one.size() * 4), 0)
              << v.label() << " " << quant_path_name(p) << " threads " << t;
        }
        omp_set_num_threads(saved);
        if (method == QuantMethod::prefill) continue;
        // Decode: each row alone, and odd column ranges, give the same bits as the whole call.
        std::vector<unsigned char> buf(
            static_cast<size_t>(quant_rows_bytes(h.view, p, QuantMethod::decode, M)));
        for (int64_t i = 0; i < M; i += 5) {
          const QuantRows r = quant_prepare_rows(h.view, p, QuantMethod::decode,
                                                 X.data() + i * 300, 300, 1, buf.data());
          std::vector<float> c(200);
          quant_decode_serial(h.view, r, 0, 13, c.data(), 200);
          quant_decode_serial(h.view, r, 13, 187, c.data() + 13, 200);
          EXPECT_EQ(std::memcmp(c.data(), one.data() + i * 200, 800), 0)
              << v.label() << " " << quant_path_name(p) << " row " << i;
        }
      }
    }
  }
}

// ---- the tiled layout (quant_matrix.hpp) -----------------------------------------------------

namespace {
// The 4-bit variants, and int4 with blocks of 256 and in act-order.
struct TiledCase {
  Variant v;
  bool act_order;
};
const TiledCase kTiledCases[] = {
    {{QuantFormatId::int4, 32, false}, false}, {{QuantFormatId::int4, 64, true}, false},
    {{QuantFormatId::int4, 128, false}, false}, {{QuantFormatId::int4, 128, true}, true},
    {{QuantFormatId::int4, 256, true}, false},  {{QuantFormatId::mxfp4, 0, false}, false},
};
// K: one sub-block, off the sub-block, off the group and the chunk, long; N: 1 to 5 tiles.
const Shape kTiledShapes[] = {{32, 16}, {100, 48}, {300, 80}, {2100, 32}};

Held tiled_case_weights(const TiledCase& c, int64_t K, int64_t N, Rng& rng) {
  Held h = random_weights(c.v, K, N, rng);
  if (c.act_order) {  // any order of K serves the kernels: the rows are gathered by it
    h.i4.perm.resize(static_cast<size_t>(K));
    std::iota(h.i4.perm.begin(), h.i4.perm.end(), 0);
    for (int64_t k = K - 1; k > 0; --k) std::swap(h.i4.perm[static_cast<size_t>(k)], h.i4.perm[static_cast<size_t>(rng.below(k + 1))]);
    h.view = h.i4.view();
  }
  return h;
}

std::string tiled_label(const TiledCase& c, const Shape& s) {
  return c.v.label() + (c.act_order ? "_act" : "") + " K " + std::to_string(s.K) + " N " +
         std::to_string(s.N);
}
}  // namespace

TEST(QuantTiled, HoldsTheSameValuesAndUntilesToTheSameBytes) {
  Rng rng(21);
  for (const TiledCase& c : kTiledCases)
    for (const Shape& s : kTiledShapes) {
      SCOPED_TRACE(tiled_label(c, s));
      const Held h = tiled_case_weights(c, s.K, s.N, rng);
      QuantStorage tiles, back, part;
      const QuantMatrix T = quant_tiled(h.view, tiles);
      ASSERT_TRUE(T.tiled);
      EXPECT_EQ(T.stored_bytes(), h.view.stored_bytes());
      for (int64_t r = 0; r < s.K; ++r)
        for (int64_t j = 0; j < s.N; ++j)
          ASSERT_EQ(quant_value_at(T, r, j), quant_value_at(h.view, r, j)) << r << " " << j;
      // Untiled whole: the bytes the column layout had.
      const QuantMatrix U = quant_untiled(T, 0, s.N, back);
      const int64_t col = h.view.sub_blocks() * 16, bk = h.view.blocks_k();
      const int64_t sb = c.v.format == QuantFormatId::int4 ? 2 : 1;
      ASSERT_EQ(U.code_stride, col);
      for (int64_t j = 0; j < s.N; ++j) {
        EXPECT_EQ(std::memcmp(U.codes + j * col, h.view.codes + j * h.view.code_stride, col), 0);
        EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(U.scales) + j * bk * sb,
                              static_cast<const uint8_t*>(h.view.scales) + j * h.view.scale_stride * sb,
                              bk * sb), 0);
        if (h.view.zero_points) {
          EXPECT_EQ(std::memcmp(U.zeros + j * bk, h.view.zeros + j * h.view.zero_stride, bk), 0);
        }
      }
      // A range off the tiles: its columns.
      const int64_t j0 = 5, n = s.N - 7;
      const QuantMatrix P = quant_untiled(T, j0, n, part);
      for (int64_t r = 0; r < s.K; r += 7)
        for (int64_t j = 0; j < n; ++j)
          ASSERT_EQ(quant_value_at(P, r, j), quant_value_at(h.view, r, j0 + j)) << r << " " << j;
    }
  // What the layout cannot hold.
  Rng r2(2);
  const Held odd = random_weights({QuantFormatId::int4, 128, false}, 256, 40, r2);
  QuantMatrix bad = odd.view;
  bad.tiled = true;
  bad.code_stride = 16 * 128;
  const auto refusal = [](const QuantMatrix& W) {
    try {
      validate(W);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(refusal(bad).find("the tiled layout needs 4-bit codes, N a multiple of 16 (got 40)"),
            std::string::npos) << refusal(bad);
  const Held f8 = random_weights({QuantFormatId::fp8, 0, false}, 256, 32, r2);
  bad = f8.view;
  bad.tiled = true;
  EXPECT_NE(refusal(bad).find("the tiled layout needs 4-bit codes"), std::string::npos)
      << refusal(bad);
}

// The rows of a tiled decode are quant_s8 per G = min(block_k, 128) values (mxfp4 with shared
// exponents: 128) exactly (each value, scale and sum), placed per chunk even then odd: rows
// with zeros, a NaN, an infinity and ties at .5 included, in every block size and with and
// without zero points.
TEST(QuantTiled, RowsAreQuantS8OfEachBlockExactly) {
  Rng rng(31);
  for (const TiledCase& c : kTiledCases) {
    const int64_t K = 300, M = 5;
    const Held h = tiled_case_weights(c, K, 32, rng);
    if (!runs(QuantPath::avx512_vnni, h.view)) GTEST_SKIP() << "no AVX512-VNNI path here";
    QuantStorage st;
    const QuantMatrix T = quant_tiled(h.view, st);
    std::vector<float> X = rng.vec(M * K, 2.0);
    for (int64_t k = 0; k < 64; ++k) X[static_cast<size_t>(K + k)] = 0.0f;   // row 1: a zero block
    X[2 * K + 7] = std::nanf("");                                              // row 2: NaN
    X[3 * K + 40] = std::numeric_limits<float>::infinity();                    // row 3: inf
    for (int64_t k = 0; k < K; ++k) X[static_cast<size_t>(4 * K + k)] = 0.5f * static_cast<float>(k % 9 - 4);  // ties
    std::vector<unsigned char> buf(static_cast<size_t>(
        quant_rows_bytes(T, QuantPath::avx512_vnni, QuantMethod::decode, M)));
    const QuantRows r =
        quant_prepare_rows(T, QuantPath::avx512_vnni, QuantMethod::decode, X.data(), K, M, buf.data());
    ASSERT_TRUE(r.tiled);
    const bool mx = c.v.format == QuantFormatId::mxfp4;
    EXPECT_EQ(r.shared_exponents, mx && vbmi_expected());
    const int64_t G = tiled_rows_block(T), blocks = r.ld / G;
    const float half = mx ? 0.5f : 1.0f;
    const float zero = !mx ? 8.0f : r.shared_exponents ? 128.0f : 12.0f;
    for (int64_t i = 0; i < M; ++i) {
      std::vector<float> v(static_cast<size_t>(r.ld), 0.0f);
      for (int64_t k = 0; k < K; ++k)
        v[static_cast<size_t>(k)] = X[static_cast<size_t>(i * K + (T.act_order ? T.perm[k] : k))];
      for (int64_t b = 0; b < blocks; ++b) {
        const float s = quant_s8_scale(v.data() + b * G, G);
        int sum = 0;
        for (int64_t k = b * G; k < (b + 1) * G; ++k) {
          const int8_t want = quant_s8(v[static_cast<size_t>(k)], s);
          sum += want;
          const int64_t ch = k / 128, o = k % 128;
          const int8_t got = static_cast<const int8_t*>(r.data)[i * r.ld + ch * 128 + (o % 2) * 64 + o / 2];
          ASSERT_EQ(got, want) << c.v.label() << " row " << i << " k " << k;
        }
        const float sc = r.scales[i * blocks + b], su = r.sums[i * blocks + b];
        const float want_sc = s * half;
        const float want_su = T.zero_points ? static_cast<float>(sum) : static_cast<float>(sum) * (zero * want_sc);
        ASSERT_EQ(std::memcmp(&sc, &want_sc, 4), 0) << c.v.label() << " row " << i << " block " << b;
        ASSERT_EQ(std::memcmp(&su, &want_su, 4), 0) << c.v.label() << " row " << i << " block " << b;
      }
    }
  }
}

TEST(QuantTiled, DecodeMatchesTheTwinAndItsBitsDependOnNeitherThreadsNorColumnsNorRows) {
  Rng rng(23);
  int checked = 0;
  for (const TiledCase& c : kTiledCases)
    for (const Shape& s : kTiledShapes) {
      const Held h = tiled_case_weights(c, s.K, s.N, rng);
      if (!runs(QuantPath::avx512_vnni, h.view)) GTEST_SKIP() << "no AVX512-VNNI path here";
      QuantStorage tiles;
      const QuantMatrix T = quant_tiled(h.view, tiles);
      for (const int64_t M : {1, 2, 3, 4, 5, 8, 9, 16}) {
        const std::string what = tiled_label(c, s) + " M " + std::to_string(M);
        const std::vector<float> X = rng.vec(M * s.K, 1.0);
        const std::vector<float> C = run(T, QuantPath::avx512_vnni, QuantMethod::decode, X, M);
        expect_rel(C, twin(T, rounded_rows(T, X, QuantPath::avx512_vnni), M), 1e-3, what);
        ++checked;
        if (M != 9) continue;
        const int saved = omp_get_max_threads();
        for (int t : {1, 3}) {
          omp_set_num_threads(t);
          const std::vector<float> other = run(T, QuantPath::avx512_vnni, QuantMethod::decode, X, M);
          EXPECT_EQ(std::memcmp(C.data(), other.data(), C.size() * 4), 0) << what << " threads " << t;
        }
        omp_set_num_threads(saved);
        // Each row alone, over column ranges off the tiles: the same bits.
        std::vector<unsigned char> buf(
            static_cast<size_t>(quant_rows_bytes(T, QuantPath::avx512_vnni, QuantMethod::decode, 1)));
        for (int64_t i = 0; i < M; i += 4) {
          const QuantRows r = quant_prepare_rows(T, QuantPath::avx512_vnni, QuantMethod::decode,
                                                 X.data() + i * s.K, s.K, 1, buf.data());
          ASSERT_TRUE(r.tiled);
          std::vector<float> row(static_cast<size_t>(s.N), -1.0f);
          const int64_t cut = std::min<int64_t>(13, s.N - 1);
          quant_decode_serial(T, r, 0, cut, row.data(), s.N);
          quant_decode_serial(T, r, cut, s.N - cut, row.data() + cut, s.N);
          EXPECT_EQ(std::memcmp(row.data(), C.data() + i * s.N, s.N * 4), 0) << what << " row " << i;
        }
      }
    }
  RecordProperty("cases", checked);
}

// mxfp4 on the tiled decode: chunks of 128 whose columns' four exponents lie within 3 of their
// least share it (with VBMI), the others take a step per block of 32. Per chunk of K 576
// (4 chunks and a last one of 2 blocks), N 48: 0 all within 3; 1 column 5 spread 4; 2 column
// 40 with a 255 (NaN: its column NaN); the last chunk short. Columns 2, 9, ... have exponents
// 0 (2^-127), 1, 2, 3 in every chunk (outputs ~1e-37). Each column against the twin on its
// own, M 1 to 8 rows.
TEST(QuantTiled, Mxfp4ChunksSharedOrNotMatchTheTwin) {
  Rng rng(37);
  const int64_t K = 576, N = 48, S = K / 32;
  Held h = random_weights({QuantFormatId::mxfp4, 0, false}, K, N, rng);
  if (!runs(QuantPath::avx512_vnni, h.view)) GTEST_SKIP() << "no AVX512-VNNI path here";
  const auto e = [&](int64_t j, int64_t b) -> uint8_t& { return h.mx.scales[static_cast<size_t>(j * S + b)]; };
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t b = 0; b < S; ++b) e(j, b) = static_cast<uint8_t>(118 + rng.below(4));
    if (j % 7 == 2)
      for (int64_t b = 0; b < S; ++b) e(j, b) = static_cast<uint8_t>(b % 4);
  }
  e(5, 4) = 118;  // a spread of 4 in chunk 1
  e(5, 5) = 122;
  e(40, 9) = 255;
  QuantStorage tiles;
  const QuantMatrix T = quant_tiled(h.view, tiles);
  for (const int64_t M : {1, 3, 5, 8}) {
    const std::vector<float> X = rng.vec(M * K, 1.0);
    const std::vector<float> C = run(T, QuantPath::avx512_vnni, QuantMethod::decode, X, M);
    const std::vector<double> want = twin(T, rounded_rows(T, X, QuantPath::avx512_vnni), M);
    for (int64_t j = 0; j < N; ++j) {
      double err = 0, norm = 0;
      for (int64_t i = 0; i < M; ++i) {
        const double g = C[static_cast<size_t>(i * N + j)], w = want[static_cast<size_t>(i * N + j)];
        if (j == 40) {
          EXPECT_TRUE(std::isnan(g) && std::isnan(w)) << "M " << M << " row " << i;
          continue;
        }
        err = std::max(err, std::abs(g - w));
        norm = std::max(norm, std::abs(w));
      }
      if (j == 40) continue;
      EXPECT_GT(norm, 0.0) << "M " << M << " column " << j;
      EXPECT_LE(err, 1e-5 * norm) << "M " << M << " column " << j;
    }
  }
}

TEST(QuantTiled, EveryOtherKernelReadsItAsTheColumnLayout) {
  Rng rng(29);
  for (const TiledCase& c : kTiledCases)
    for (const Shape& s : kTiledShapes) {
      const Held h = tiled_case_weights(c, s.K, s.N, rng);
      QuantStorage tiles;
      const QuantMatrix T = quant_tiled(h.view, tiles);
      for (const int64_t M : {1, 5, 20}) {
        const std::vector<float> X = rng.vec(M * s.K, 1.0);
        for (const QuantPath p : kPaths) {
          if (!runs(p, h.view)) continue;
          for (const QuantMethod m : {QuantMethod::decode, QuantMethod::prefill}) {
            if (m == QuantMethod::decode && (p == QuantPath::avx512_vnni || M > 16)) continue;
            const std::vector<float> want = run(h.view, p, m, X, M);
            const std::vector<float> got = run(T, p, m, X, M);
            EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0)
                << tiled_label(c, s) << " M " << M << " " << quant_path_name(p)
                << (m == QuantMethod::decode ? " decode" : " prefill");
          }
        }
      }
    }
}

// quant_matmul_grouped's rows and panels start on 64-byte lines, each product's rows too (the
// bf16 decode loads 64 bytes of a row at a time: 16 bytes off a line it ran ~1.4x slower),
// whatever the products' sizes; the results are the products' own.
TEST(QuantGroup, RowsAndPanelsStartOnLines) {
  Rng rng(43);
  const Held a = random_weights({QuantFormatId::fp8, 128, false}, 4096, 40, rng);
  const Held b = random_weights({QuantFormatId::int4, 64, true}, 200, 24, rng);
  // 16 rows of K 4096: 128 KiB of bf16 rows, past malloc's mmap threshold (16 bytes off a line).
  const std::vector<float> Xa = rng.vec(16 * 4096, 1.0), Xb = rng.vec(40 * 200, 1.0);
  std::vector<float> Ca(16 * 40), Cb(40 * 24);
  std::vector<QuantProduct> ps(2);
  ps[0].W[0] = &a.view, ps[0].C[0] = Ca.data(), ps[0].X = Xa.data(), ps[0].ldx = 4096, ps[0].M = 16,
  ps[0].ldc = 40;
  ps[1].W[0] = &b.view, ps[1].C[0] = Cb.data(), ps[1].X = Xb.data(), ps[1].ldx = 200, ps[1].M = 40,
  ps[1].ldc = 24;  // prefill: a panel per thread
  QuantGroupWorkspace ws;
  quant_matmul_grouped(ps, ws);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ws.rows.data()) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ws.panels.data()) % 64, 0u);
  EXPECT_EQ(ws.panels.size() % (32 * static_cast<size_t>(omp_get_max_threads())), 0u);
  for (const QuantRows& r : ws.prepared)
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r.data) % 64, 0u);
  const std::vector<float> wa = run(a.view, ws.prepared[0].path, ws.prepared[0].method, Xa, 16);
  const std::vector<float> wb = run(b.view, ws.prepared[1].path, ws.prepared[1].method, Xb, 40);
  EXPECT_EQ(std::memcmp(Ca.data(), wa.data(), Ca.size() * 4), 0);
  EXPECT_EQ(std::memcmp(Cb.data(), wb.data(), Cb.size() * 4), 0);
}

TEST(QuantTiled, TheLayerHoldsTiledMatricesWhereTheVnniDecodeReadsThem) {
  Rng rng(31);
  for (const int64_t N : {int64_t{48}, int64_t{40}}) {
    const Held h = random_weights({QuantFormatId::int4, 64, true}, 300, N, rng);
    QuantHeld held;
    held.adopt(h.view);
    const bool want = N % 16 == 0 && quant_decode_path(QuantFormatId::int4) == QuantPath::avx512_vnni;
    EXPECT_EQ(held.m.tiled, want) << N;
    EXPECT_EQ(quant_tiling_wanted(h.view), want) << N;
    EXPECT_EQ(held.bytes(), h.view.stored_bytes());
    const QuantHeld copy = held;  // adopts a tiled view: its tiles as they are
    EXPECT_EQ(copy.m.tiled, want);
    for (int64_t r = 0; r < 300; r += 3)
      for (int64_t j = 0; j < N; ++j)
        ASSERT_EQ(quant_value_at(copy.m, r, j), quant_value_at(h.view, r, j)) << r << " " << j;
    // The kernels' 64-byte loads start on lines (common/aligned.hpp).
    for (const QuantHeld* q : std::initializer_list<const QuantHeld*>{&held, &copy}) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(q->m.codes) % 64, 0u) << N;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(q->m.scales) % 64, 0u) << N;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(q->m.zeros) % 64, 0u) << N;
    }
  }
  // 4 MiB of codes or more: mapped on their own, 2 MiB aligned (huge pages where advised).
  const Held big = random_weights({QuantFormatId::fp8, 128, false}, 2048, 2048, rng);
  QuantHeld held;
  held.adopt(big.view);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(held.m.codes) % (uintptr_t{2} << 20), 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(held.m.scales) % 64, 0u);
}

// ---- prefill ---------------------------------------------------------------------------------

namespace {
// The twin of prefill: the kernel's widened weights, bf16(fp32(value) · fp32(scale)).
std::vector<double> twin_bf16_weights(const QuantMatrix& W, const std::vector<double>& A,
                                      int64_t M) {
  std::vector<double> Wd(static_cast<size_t>(W.K * W.N));
  for (int64_t r = 0; r < W.K; ++r)
    for (int64_t j = 0; j < W.N; ++j)
      Wd[r * W.N + j] = round_bf16(static_cast<float>(quant_value_at(W, r, j)));
  std::vector<double> C(static_cast<size_t>(M * W.N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t r = 0; r < W.K; ++r) {
      const double a = A[i * W.K + (W.act_order ? W.perm[r] : r)];
      for (int64_t j = 0; j < W.N; ++j) C[i * W.N + j] += a * Wd[r * W.N + j];
    }
  return C;
}
}  // namespace

TEST(QuantPrefill, MatchesTheTwinOnTheWidenedWeights) {
  Rng rng(5);
  double worst_unrounded = 0.0;
  for (const Variant& v : kVariants)
    for (const Shape& s : kShapes) {
      const Held h = random_weights(v, s.K, s.N, rng);
      for (const int64_t M : {1, 16, 37}) {
        const std::vector<float> X = rng.vec(M * s.K, 1.0);
        const std::vector<double> Xr = rounded_rows(h.view, X, QuantPath::avx512_bf16);
        for (const QuantPath p : kPaths) {
          if (!runs(p, h.view)) continue;
          const std::vector<float> C = run(h.view, p, QuantMethod::prefill, X, M);
          const std::string what = v.label() + " K " + std::to_string(s.K) + " N " +
                                   std::to_string(s.N) + " M " + std::to_string(M) + " " +
                                   quant_path_name(p);
          if (p == QuantPath::avx512_vnni) {
            // int8 rows per 128 values against the exact stored values.
            expect_rel(C, twin(h.view, rounded_rows(h.view, X, p, QuantMethod::prefill), M), 1e-5,
                       what);
            continue;
          }
          expect_rel(C, twin_bf16_weights(h.view, Xr, M), 1e-5, what);
          // Against the unrounded weights: what widening to bf16 costs (over enough outputs
          // that the largest one is not a cancellation).
          if (M * s.N >= 64)
            worst_unrounded = std::max(worst_unrounded, moe_test::rel_max_err(C, twin(h.view, Xr, M)));
        }
      }
    }
  RecordProperty("worst_vs_unrounded_weights", std::to_string(worst_unrounded));
  EXPECT_LE(worst_unrounded, 4e-3);
}

// mxfp4 on int8 panels sums a chunk's four blocks of 32 as one block of 128 where each column's
// four exponents lie within 3 of their least (the values shifted up to 8×, still exact bytes),
// and keeps blocks of 32 in a panel where one column's spread is wider or a scale is NaN. Both
// kinds of panel, side by side in one matrix, against the twin on the stored values.
TEST(QuantPrefill, Mxfp4SharesAChunksExponentWhereTheySpreadAtMost3) {
  if (!runs(QuantPath::avx512_vnni, Mxfp4Kernel::Weights{}.view()))
    GTEST_SKIP() << "no AVX512-VNNI path here";
  Rng rng(21);
  const int64_t K = 300, N = 200;  // chunks of 128, 128 and 44 values; panels of 64, …, 8 columns
  Held h = random_weights({QuantFormatId::mxfp4, 0, false}, K, N, rng);
  const int64_t stride = h.view.scale_stride;
  uint8_t* e = h.mx.scales.data();
  const auto at = [&](int64_t j, int64_t b) -> uint8_t& { return e[j * stride + b]; };
  // Panel 0: spread 3 with the largest code (6 · 2 · 8 = 96) in the shifted block.
  at(5, 0) = 118, at(5, 1) = 121, at(5, 2) = 119, at(5, 3) = 120;
  for (int64_t k = 32; k < 64; k += 2) h.mx.blocks[5 * h.view.code_stride + k / 2] = 0x77;  // +6, +6
  // Panel 1: one column's chunk spreads 4 → blocks of 32.
  at(70, 4) = 118, at(70, 6) = 122;
  // Panel 2: a NaN scale (0xff) → blocks of 32, and that column's outputs NaN.
  at(140, 9) = 0xff;
  // Panel 3 (8 columns): the partial last chunk (two blocks) spreads 3.
  at(195, 8) = 117, at(195, 9) = 120;
  h.view = h.mx.view();
  const QuantMatrix& W = h.view;
  EXPECT_TRUE(quant_impl::prefill_vnni_mxfp4_shared(W, 0, 64, 0, K));
  EXPECT_FALSE(quant_impl::prefill_vnni_mxfp4_shared(W, 64, 64, 0, K));
  EXPECT_FALSE(quant_impl::prefill_vnni_mxfp4_shared(W, 128, 64, 0, K));
  EXPECT_TRUE(quant_impl::prefill_vnni_mxfp4_shared(W, 192, 8, 0, K));
  for (const int64_t M : {1, 7, 37}) {
    SCOPED_TRACE("M " + std::to_string(M));
    const std::vector<float> X = rng.vec(M * K, 1.0);
    std::vector<float> C = run(W, QuantPath::avx512_vnni, QuantMethod::prefill, X, M);
    std::vector<double> want = twin(W, rounded_rows(W, X, QuantPath::avx512_vnni, QuantMethod::prefill), M);
    for (int64_t i = 0; i < M; ++i) {
      EXPECT_TRUE(std::isnan(C[i * N + 140])) << "row " << i;
      C[i * N + 140] = 0.0f;
      want[i * N + 140] = 0.0;
    }
    expect_rel(C, want, 1e-5, "mxfp4, both kinds of panel");
  }
}

TEST(QuantPrefill, WidenedPanelsAreTheDefinitionOnEveryPath) {
  Rng rng(9);
  for (const Variant& v : kVariants) {
    const Held h = random_weights(v, 2100, 100, rng);
    const QuantMatrix& W = h.view;
    struct Cut {
      int64_t j0, nc, k0, kc;
    };
    // Prefill's panels start on a 128-value chunk (its own 4-bit widening); others take the
    // general one.
    for (const Cut c : {Cut{0, 64, 0, 2048}, Cut{64, 36, 2048, 52}, Cut{7, 50, 0, 301},
                        Cut{0, 64, 2048, 51}, Cut{5, 17, 32, 33}, Cut{99, 1, 96, 1},
                        Cut{30, 64, 0, 2100}}) {
      const int64_t size = packed_bf16_size(c.kc, kPanelCols);
      std::vector<uint16_t> want(static_cast<size_t>(size), 0);
      for (int64_t k = 0; k < c.kc; ++k)
        for (int64_t j = 0; j < c.nc; ++j)
          want[packed_bf16_index(c.kc, k, j)] =
              to_bf16(static_cast<float>(quant_value_at(W, c.k0 + k, c.j0 + j)));
      for (const QuantPath p : kPaths) {
        if (!runs(p, W)) continue;
        std::vector<uint16_t> got(static_cast<size_t>(size), 0xdead);
        quant_widen_panel(W, p, c.j0, c.nc, c.k0, c.kc, got.data());
        EXPECT_EQ(got, want) << v.label() << " " << quant_path_name(p) << " j0 " << c.j0
                             << " k0 " << c.k0 << " kc " << c.kc;
      }
    }
  }
}

// ---- libmoe's int4 quantizer -----------------------------------------------------------------

namespace {
// Standard normal by Box–Muller from the portable generator.
double normal(Rng& rng) {
  const double u = 1.0 - rng.uniform(), v = rng.uniform();
  return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
}
// Student-t with 3 degrees of freedom: heavy tails, as trained weights have outliers.
double student_t3(Rng& rng) {
  double chi2 = 0.0;
  for (int i = 0; i < 3; ++i) {
    const double z = normal(rng);
    chi2 += z * z;
  }
  return normal(rng) / std::sqrt(chi2 / 3.0);
}
}  // namespace

TEST(Int4Quantizer, ErrorOnRandomAndHeavyTailedWeightsIsBounded) {
  const int64_t K = 1024, N = 256, M = 8;
  struct Dist {
    const char* name;
    double (*draw)(Rng&);
  };
  // Bounds (relative Frobenius error of the weights) with ~10% room over what was measured
  // (docs/quant.md); the product's error is about the same.
  struct Bound {
    int64_t group;
    bool zp;
    double normal, heavy;
  };
  const Bound bounds[] = {{32, false, 0.090, 0.137}, {64, false, 0.099, 0.171},
                          {128, false, 0.106, 0.208}, {32, true, 0.086, 0.110},
                          {64, true, 0.096, 0.140},  {128, true, 0.105, 0.175}};
  for (const Dist d : {Dist{"normal", normal}, Dist{"student_t3", student_t3}}) {
    Rng rng(42);
    std::vector<float> W(static_cast<size_t>(K * N));
    for (auto& w : W) w = static_cast<float>(0.02 * d.draw(rng));
    const std::vector<float> X = rng.vec(M * K, 1.0);
    std::vector<double> exact(static_cast<size_t>(M * N), 0.0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j) exact[i * N + j] += double{X[i * K + k]} * W[k * N + j];
    for (const Bound& b : bounds) {
      const Int4Kernel::Weights q = quantize_int4(W.data(), K, N, {b.group, b.zp, true});
      std::vector<double> deq(static_cast<size_t>(K * N));
      quant_dequant_ref(q.view(), deq.data());
      const double werr = moe_test::rel_fro(deq, W);
      // The plain range (no search) as the baseline the search must not lose to.
      const Int4Kernel::Weights plain = quantize_int4(W.data(), K, N, {b.group, b.zp, false});
      std::vector<double> deq_plain(static_cast<size_t>(K * N));
      quant_dequant_ref(plain.view(), deq_plain.data());
      const double werr_plain = moe_test::rel_fro(deq_plain, W);
      EXPECT_LE(werr, werr_plain);
      const std::vector<double> prod = twin(q.view(), to_double(X), M);
      const double perr = moe_test::rel_fro(prod, exact);
      const std::string key = std::string(d.name) + "_g" + std::to_string(b.group) + (b.zp ? "_zp" : "_sym");
      RecordProperty(key + "_weights", std::to_string(werr));
      RecordProperty(key + "_weights_plain", std::to_string(werr_plain));
      RecordProperty(key + "_product", std::to_string(perr));
      EXPECT_LE(werr, std::string(d.name) == "normal" ? b.normal : b.heavy) << key;
      EXPECT_LE(perr, 1.1 * (std::string(d.name) == "normal" ? b.normal : b.heavy)) << key;
    }
  }
}

TEST(Int4Quantizer, ExactWhereTheCodesCanBeExact) {
  // A group whose values are multiples of one step in −8..7 (symmetric) is stored exactly.
  const int64_t K = 64, N = 3;
  std::vector<float> W(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) W[k * N + j] = 0.25f * static_cast<float>((k * 7 + j) % 16 - 8);
  const Int4Kernel::Weights q = quantize_int4(W.data(), K, N, {32, false});
  std::vector<double> deq(static_cast<size_t>(K * N));
  quant_dequant_ref(q.view(), deq.data());
  for (size_t i = 0; i < W.size(); ++i) EXPECT_EQ(deq[i], W[i]) << i;
  // A column of zeros stays zeros, with or without zero points.
  std::vector<float> Z(static_cast<size_t>(K * N), 0.0f);
  for (bool zp : {false, true}) {
    const Int4Kernel::Weights qz = quantize_int4(Z.data(), K, N, {64, zp});
    quant_dequant_ref(qz.view(), deq.data());
    for (double x : deq) EXPECT_EQ(x, 0.0);
  }
}

TEST(Int4Quantizer, RefusesWhatItCannotHold) {
  std::vector<float> W(64 * 2, 0.5f);
  auto msg = [&](Int4Options o) {
    try {
      quantize_int4(W.data(), 64, 2, o);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg({48, false}).find("group must be 32, 64 or 128, got 48"), std::string::npos);
  W[5] = std::nanf("");
  EXPECT_NE(msg({32, false}).find("weight (2, 1) is not finite"), std::string::npos) << msg({32, false});
  W[5] = 1e9f;
  EXPECT_NE(msg({32, false}).find("beyond fp16"), std::string::npos) << msg({32, false});
}

// ---- GPTQ and AWQ ------------------------------------------------------------------------------

namespace {
struct GptqArrays {
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales;
  GptqInt4 t;
};
// Random words (every bit pattern is a valid checkpoint); act_order scatters each group's rows.
GptqArrays random_gptq(int64_t K, int64_t N, int64_t group, bool act_order, bool with_g_idx,
                       bool v1, Rng& rng) {
  GptqArrays a;
  a.t.K = K;
  a.t.N = N;
  a.t.group = group;
  a.t.zeros_minus_one = v1;
  const int64_t G = a.t.groups(), g = group == -1 ? K : group;
  a.qweight.resize(static_cast<size_t>(K / 8 * N));
  a.qzeros.resize(static_cast<size_t>(G * N / 8));
  a.scales.resize(static_cast<size_t>(G * N));
  for (auto& w : a.qweight) w = static_cast<int32_t>(static_cast<uint32_t>(rng.uniform() * 4294967296.0));
  for (auto& w : a.qzeros) w = static_cast<int32_t>(static_cast<uint32_t>(rng.uniform() * 4294967296.0));
  for (auto& s : a.scales) s = f32_to_f16(static_cast<float>(0.001 + 0.02 * rng.uniform()));
  if (with_g_idx) {
    a.g_idx.resize(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) a.g_idx[k] = static_cast<int32_t>(k / g);
    if (act_order)  // a random permutation of the group ids: each group keeps its size
      for (int64_t k = K - 1; k > 0; --k) std::swap(a.g_idx[k], a.g_idx[rng.below(k + 1)]);
    a.t.g_idx = a.g_idx.data();
  }
  a.t.qweight = a.qweight.data();
  a.t.qzeros = a.qzeros.data();
  a.t.scales = a.scales.data();
  return a;
}

struct AwqArrays {
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;
  AwqInt4 t;
};
AwqArrays random_awq(int64_t K, int64_t N, int64_t group, Rng& rng) {
  AwqArrays a;
  a.t.K = K;
  a.t.N = N;
  a.t.group = group;
  a.qweight.resize(static_cast<size_t>(K * N / 8));
  a.qzeros.resize(static_cast<size_t>(a.t.groups() * N / 8));
  a.scales.resize(static_cast<size_t>(a.t.groups() * N));
  for (auto& w : a.qweight) w = static_cast<int32_t>(static_cast<uint32_t>(rng.uniform() * 4294967296.0));
  for (auto& w : a.qzeros) w = static_cast<int32_t>(static_cast<uint32_t>(rng.uniform() * 4294967296.0));
  for (auto& s : a.scales) s = f32_to_f16(static_cast<float>(0.001 + 0.02 * rng.uniform()));
  a.t.qweight = a.qweight.data();
  a.t.qzeros = a.qzeros.data();
  a.t.scales = a.scales.data();
  return a;
}

void expect_same_values(const QuantMatrix& W, const std::vector<double>& want, const std::string& what) {
  std::vector<double> got(want.size());
  quant_dequant_ref(W, got.data());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(double)), 0) << what;
}
}  // namespace

TEST(Int4Import, GptqHandPackedWords) {
  // K = 8 rows, N = 8 columns, one group: column j's word holds rows 0..7 as nibbles 0..7.
  std::vector<int32_t> qweight(8), qzeros{0x76543210};
  for (int j = 0; j < 8; ++j) qweight[j] = static_cast<int32_t>(0x9abcdef0u ^ (0x11111111u * j));
  std::vector<uint16_t> scales(8, f32_to_f16(0.5f));
  GptqInt4 t;
  t.K = 8;
  t.N = 8;
  t.group = 32;  // larger than K: one group
  t.qweight = qweight.data();
  t.qzeros = qzeros.data();
  t.scales = scales.data();
  std::vector<double> ref(64);
  gptq_dequant_ref(t, ref.data());
  for (int k = 0; k < 8; ++k)
    for (int j = 0; j < 8; ++j) {
      const int q = (static_cast<uint32_t>(qweight[j]) >> (4 * k)) & 15;
      const int z = (j + 1) & 15;  // v1: stored zero of column j is j, read as j + 1
      EXPECT_EQ(ref[k * 8 + j], 0.5 * (q - z)) << k << " " << j;
    }
  t.zeros_minus_one = false;
  gptq_dequant_ref(t, ref.data());
  EXPECT_EQ(ref[0 * 8 + 3], 0.5 * ((static_cast<uint32_t>(qweight[3]) & 15) - 3));
  // Stored 15 in v1 is zero point 0 ((15 + 1) & 15).
  qzeros[0] = static_cast<int32_t>(0xffffffffu);
  t.zeros_minus_one = true;
  gptq_dequant_ref(t, ref.data());
  EXPECT_EQ(ref[1 * 8 + 0], 0.5 * ((static_cast<uint32_t>(qweight[0]) >> 4) & 15));
}

TEST(Int4Import, GptqRepackedHoldsTheDefinition) {
  Rng rng(21);
  struct Case {
    int64_t K, N, group;
    bool g_idx, act, v1;
  };
  for (const Case c : {Case{256, 24, 32, false, false, true}, Case{256, 24, 128, true, false, true},
                       Case{512, 16, 128, true, true, true}, Case{384, 40, 64, true, true, false},
                       Case{200, 8, -1, false, false, true}, Case{1000, 8, 32, true, true, true}}) {
    const GptqArrays a = random_gptq(c.K, c.N, c.group, c.act, c.g_idx, c.v1, rng);
    std::vector<double> ref(static_cast<size_t>(c.K * c.N));
    gptq_dequant_ref(a.t, ref.data());
    const Int4Kernel::Weights w = int4_from_gptq(a.t);
    const std::string what = "K " + std::to_string(c.K) + " group " + std::to_string(c.group) +
                             (c.act ? " act-order" : "") + (c.v1 ? " v1" : " v2");
    EXPECT_EQ(!w.perm.empty(), c.act) << what;
    EXPECT_TRUE(w.zero_points) << what;
    expect_same_values(w.view(), ref, what);
    // The kernels, rows given in the checkpoint's own K order.
    const std::vector<float> X = rng.vec(3 * c.K, 1.0);
    for (const QuantPath p : kPaths) {
      if (!runs(p, w.view())) continue;
      for (const QuantMethod m : {QuantMethod::decode, QuantMethod::prefill}) {
        const std::vector<float> C = run(w.view(), p, m, X, 3);
        const std::vector<double> Xr = rounded_rows(w.view(), X, p, m);
        std::vector<double> want(static_cast<size_t>(3 * c.N), 0.0);
        for (int64_t i = 0; i < 3; ++i)
          for (int64_t k = 0; k < c.K; ++k)
            for (int64_t j = 0; j < c.N; ++j) want[i * c.N + j] += Xr[i * c.K + k] * ref[k * c.N + j];
        expect_rel(C, want, m == QuantMethod::prefill ? 4e-3 : 1e-3, what + " " + quant_path_name(p));
      }
    }
  }
}

TEST(Int4Import, GptqSymmetricCheckpointDropsItsZeroPoints) {
  Rng rng(2);
  GptqArrays a = random_gptq(256, 16, 128, false, true, true, rng);
  std::fill(a.qzeros.begin(), a.qzeros.end(), 0x77777777);  // v1: z − 1 = 7, so z = 8
  std::vector<double> ref(256 * 16);
  gptq_dequant_ref(a.t, ref.data());
  const Int4Kernel::Weights w = int4_from_gptq(a.t);
  EXPECT_FALSE(w.zero_points);
  EXPECT_TRUE(w.zeros.empty());
  expect_same_values(w.view(), ref, "symmetric");
}

TEST(Int4Import, GptqRefusesLayoutsTheKernelCannotHold) {
  Rng rng(4);
  auto msg = [](const GptqInt4& t) {
    try {
      int4_from_gptq(t);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  GptqArrays a = random_gptq(256, 16, 128, false, true, true, rng);
  a.g_idx[0] = 1;  // group 1 now has 129 rows, group 0 127
  EXPECT_NE(msg(a.t).find("g_idx puts"), std::string::npos) << msg(a.t);
  a.g_idx[0] = 2;
  EXPECT_NE(msg(a.t).find("g_idx[0] = 2 is outside the 2 groups"), std::string::npos) << msg(a.t);
  GptqArrays b = random_gptq(256, 16, 16, false, false, true, rng);
  EXPECT_NE(msg(b.t).find("group_size 16 is not 32, 64 or a multiple of 128"), std::string::npos)
      << msg(b.t);
  b.t.K = 12;
  EXPECT_NE(msg(b.t).find("multiples of 8"), std::string::npos) << msg(b.t);
}

TEST(Int4Import, AwqNibbleOrder) {
  // AutoAWQ packs column order[i] of each 8 into nibble i, order = {0, 2, 4, 6, 1, 3, 5, 7}:
  // columns holding 0..7 give the word 0x75316420.
  std::vector<int32_t> qweight(32, 0x75316420), qzeros{0};
  std::vector<uint16_t> scales(8, f32_to_f16(1.0f));
  AwqInt4 t;
  t.K = 32;
  t.N = 8;
  t.group = 32;
  t.qweight = qweight.data();
  t.qzeros = qzeros.data();
  t.scales = scales.data();
  std::vector<double> ref(32 * 8);
  awq_dequant_ref(t, ref.data());
  for (int j = 0; j < 8; ++j) EXPECT_EQ(ref[5 * 8 + j], j) << j;
  const Int4Kernel::Weights w = int4_from_awq(t);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(w.code(5, j), j);
}

TEST(Int4Import, AwqRepackedHoldsTheDefinition) {
  Rng rng(8);
  for (const int64_t group : {32, 64, 128}) {
    const AwqArrays a = random_awq(320, 24, group, rng);
    std::vector<double> ref(320 * 24);
    awq_dequant_ref(a.t, ref.data());
    const Int4Kernel::Weights w = int4_from_awq(a.t);
    expect_same_values(w.view(), ref, "AWQ group " + std::to_string(group));
    const std::vector<float> X = rng.vec(2 * 320, 1.0);
    const QuantPath p = quant_decode_path(QuantFormatId::int4);
    const std::vector<float> C = run(w.view(), p, QuantMethod::decode, X, 2);
    expect_rel(C, twin(w.view(), rounded_rows(w.view(), X, p), 2), 1e-3, "AWQ");
  }
}

// ---- the bytes for tests/python/test_quant_formats.py --------------------------------------------

namespace {
template <typename T>
void write_raw(const std::string& dir, const std::string& name, const std::vector<T>& v) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}
}  // namespace

TEST(QuantOracle, WriteCases) {
  // The Python test gives a folder; each case is raw little-endian arrays plus meta.txt
  // ("key value" lines). The Python side reads the published arrays with NumPy (and torch /
  // transformers where they define the format) and compares with what libmoe made of them:
  // its dequantized weights (through the kernel layout) and a decode product (given the rows
  // as the decode path rounded them: bf16, or int8 per 32 values).
  const char* dir_env = std::getenv("MOE_QUANT_ORACLE_DIR");
  if (!dir_env) GTEST_SKIP() << "run by tests/python/test_quant_formats.py";
  const std::string root = dir_env;
  Rng rng(2024);
  int index = 0;
  auto emit = [&](const std::string& kind, const QuantMatrix& W, const std::string& meta,
                  auto&& write_inputs) {
    const std::string dir = root + "/" + std::to_string(index++) + "_" + kind;
    ASSERT_EQ(std::system(("mkdir -p '" + dir + "'").c_str()), 0);
    write_inputs(dir);
    std::vector<double> deq(static_cast<size_t>(W.K * W.N));
    quant_dequant_ref(W, deq.data());
    write_raw(dir, "dequant", deq);
    const int64_t M = 3;
    const std::vector<float> X = rng.vec(M * W.K, 1.0);
    const QuantPath p = quant_decode_path(W.format);
    write_raw(dir, "x", rounded_rows(W, X, p));  // the rows as the decode path rounds them
    write_raw(dir, "y", run(W, p, QuantMethod::decode, X, M));
    std::ofstream(dir + "/meta.txt") << "kind " << kind << "\nK " << W.K << "\nN " << W.N
                                     << "\nM " << M << "\n" << meta;
  };
  struct G {
    int64_t K, N, group;
    bool act, v1;
  };
  for (const G c : {G{256, 16, 128, false, true}, G{512, 24, 128, true, true}, G{256, 16, 32, true, false}}) {
    const GptqArrays a = random_gptq(c.K, c.N, c.group, c.act, true, c.v1, rng);
    emit("gptq", int4_from_gptq(a.t).view(),
         "group " + std::to_string(c.group) + "\nv1 " + std::to_string(c.v1) + "\n", [&](const std::string& d) {
           write_raw(d, "qweight", a.qweight);
           write_raw(d, "qzeros", a.qzeros);
           write_raw(d, "scales", a.scales);
           write_raw(d, "g_idx", a.g_idx);
         });
  }
  for (const int64_t group : {64, 128}) {
    const AwqArrays a = random_awq(256, 24, group, rng);
    // The kernel layout outlives this scope's view: keep the weights alive until written.
    const Int4Kernel::Weights w = int4_from_awq(a.t);
    emit("awq", w.view(), "group " + std::to_string(group) + "\n", [&](const std::string& d) {
      write_raw(d, "qweight", a.qweight);
      write_raw(d, "qzeros", a.qzeros);
      write_raw(d, "scales", a.scales);
    });
  }
  {
    const Held h = random_weights({QuantFormatId::mxfp4, 0, false}, 320, 24, rng);
    emit("mxfp4", h.view, "", [&](const std::string& d) {
      write_raw(d, "blocks", h.mx.blocks);
      write_raw(d, "scales", h.mx.scales);
    });
  }
  {
    const Held h = random_weights({QuantFormatId::fp8, 0, false}, 300, 200, rng);
    emit("fp8", h.view, "", [&](const std::string& d) {
      write_raw(d, "weight", h.f8.weight);
      write_raw(d, "scale_inv", h.f8.scale_inv);
    });
  }
  {
    std::vector<float> W(256 * 40);
    for (auto& w : W) w = static_cast<float>(0.05 * normal(rng));
    const Int4Kernel::Weights q = quantize_int4(W.data(), 256, 40, {64, true});
    emit("int4", q.view(), "group 64\n", [&](const std::string& d) {
      write_raw(d, "codes", q.codes);
      write_raw(d, "scales", q.scales);
      write_raw(d, "zeros", q.zeros);
    });
  }
}
