// precision "bf16" (SPEC §6): the conversions, the bf16 GEMM, and the layer forward and
// backward against the float64 reference twin evaluated on the same bf16-rounded operands
// (tight: 1e-3 forward, 5e-3 gradients, relative to each tensor's largest entry) and against
// the fp32 layer (loose: 2e-2, what bf16 rounding costs), and the bf16 copies following every
// change of the fp32 masters. Thread-count bit identity: LayerDeterminism in test_grad.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/bf16.hpp"
#include "common/gemm.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "common/huge_pages.hpp"
#include "experts/experts.hpp"
#include "layer/layer_ref.hpp"
#include "moe/layer.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::MoEConfig;
using moe::MoELayer;
using moe::Precision;
using moe_test::Rng;
using moe_test::rel_max_err;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

TEST(Bf16Convert, RoundsToNearestEven) {
  using moe::detail::from_bf16;
  using moe::detail::to_bf16;
  EXPECT_EQ(to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
  EXPECT_EQ(to_bf16(1.0f + 3.0f * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);  // above half
  EXPECT_EQ(to_bf16(-2.5f), 0xc020);
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A signalling-NaN payload that rounding would carry into the infinity stays a NaN.
  float snan;
  const uint32_t u = 0x7f80ffffu;
  std::memcpy(&snan, &u, 4);
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(snan))));
  // The largest finite float rounds up to infinity, as RNE says.
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(bits(from_bf16(0x3f81)), 0x3f810000u);
}

TEST(Bf16Convert, LoopsAndTransposesAgreeWithTheScalar) {
  Rng rng(3);
  const int64_t rows = 37, cols = 70;
  std::vector<float> a(static_cast<size_t>(rows * cols));
  for (auto& v : a) v = static_cast<float>(rng.sym(3.0));
  std::vector<uint16_t> n(a.size()), r(a.size()), t(a.size()), tt(a.size());
  moe::detail::to_bf16_n(n.data(), a.data(), rows * cols);
  moe::detail::to_bf16_rows(r.data(), cols, a.data(), cols, rows, cols);
  moe::detail::to_bf16_transposed(t.data(), rows, a.data(), cols, rows, cols);
  moe::detail::transpose_bf16(tt.data(), cols, t.data(), rows, cols, rows);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const uint16_t want = moe::detail::to_bf16(a[i * cols + j]);
      ASSERT_EQ(n[i * cols + j], want);
      ASSERT_EQ(r[i * cols + j], want);
      ASSERT_EQ(t[j * rows + i], want);
      ASSERT_EQ(tt[i * cols + j], want);
    }
}

// C = A·B (+ C) on bf16 operands against a double sum of the same operands, sizes off every
// tile and leading dimensions wider than the rows.
TEST(Bf16Gemm, MatchesTheDoubleSumOfTheSameOperands) {
  Rng rng(5);
  for (auto [M, N, K] : {std::array<int64_t, 3>{1, 1, 1}, {3, 17, 5}, {33, 65, 129},
                         {70, 300, 31}}) {
    SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K));
    const int64_t lda = K + 3, ldb = N + 5, ldc = N + 2;
    std::vector<uint16_t> A(static_cast<size_t>(M * lda)), B(static_cast<size_t>(K * ldb));
    for (auto& v : A) v = moe::detail::to_bf16(static_cast<float>(rng.sym(1.0)));
    for (auto& v : B) v = moe::detail::to_bf16(static_cast<float>(rng.sym(1.0)));
    for (float beta : {0.0f, 1.0f}) {
      std::vector<float> C(static_cast<size_t>(M * ldc), 0.5f);
      moe::detail::gemm_bf16_serial(M, N, K, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double want = beta * 0.5;
          for (int64_t p = 0; p < K; ++p)
            want += static_cast<double>(moe::detail::from_bf16(A[i * lda + p])) *
                    moe::detail::from_bf16(B[p * ldb + j]);
          ASSERT_NEAR(C[i * ldc + j], want, 1e-5 * (1.0 + std::sqrt(static_cast<double>(K))))
              << i << "," << j;
        }
      EXPECT_EQ(C[ldc - 1], 0.5f) << "wrote past the row";
    }
  }
}

// The packed layout (common/gemm_bf16_packed.hpp): every element where packed_bf16_index says,
// from a row-major source and from the transpose of one, and zeros in all the padding.
TEST(Bf16Packed, LayoutMatchesTheIndexAndPadsWithZeros) {
  using namespace moe::detail;
  Rng rng(11);
  // K beyond one tile of pairs (64 rows), odd K at a tile's edge, a panel cut short.
  for (auto [K, N] : {std::pair<int64_t, int64_t>{1, 1}, {16, 64}, {17, 65}, {37, 130}, {2, 200},
                      {100, 70}, {129, 3}, {65, 64}}) {
    SCOPED_TRACE(std::to_string(K) + "x" + std::to_string(N));
    std::vector<float> W(static_cast<size_t>(K * N));
    for (auto& v : W) v = static_cast<float>(rng.sym(2.0));
    std::vector<float> Wt(W.size());  // (N, K)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) Wt[j * K + k] = W[k * N + j];
    const int64_t size = packed_bf16_size(K, N);
    EXPECT_EQ(size, (K + 31) / 32 * 32 * ((N + 63) / 64 * 64));  // K to a whole AMX tile
    std::vector<uint16_t> p(static_cast<size_t>(size), 0xffff), pt(p), pb(p);
    pack_bf16(p.data(), W.data(), N, 1, K, N);
    pack_bf16(pt.data(), Wt.data(), 1, K, K, N);
    std::vector<uint16_t> Wb(W.size());
    to_bf16_n(Wb.data(), W.data(), K * N);
    pack_bf16(pb.data(), Wb.data(), N, 1, K, N);
    std::vector<uint16_t> Wbt(W.size()), pbt(p);  // a bf16 (N, K) source, as a checkpoint's
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) Wbt[j * K + k] = Wb[k * N + j];
    pack_bf16(pbt.data(), Wbt.data(), 1, K, K, N);
    std::vector<char> used(static_cast<size_t>(size), 0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) {
        const int64_t i = packed_bf16_index(K, k, j);
        ASSERT_GE(i, 0);
        ASSERT_LT(i, size);
        ASSERT_FALSE(used[i]) << "two elements share " << i;
        used[i] = 1;
        ASSERT_EQ(p[i], to_bf16(W[k * N + j])) << k << "," << j;
      }
    for (int64_t i = 0; i < size; ++i)
      if (!used[i]) {
        ASSERT_EQ(p[i], 0) << "padding at " << i;
      }
    EXPECT_EQ(pt, p);
    EXPECT_EQ(pb, p);
    EXPECT_EQ(pbt, p);
  }
}

// The packed stacks' allocator: large stacks on their own 2 MiB-aligned mapping (huge pages
// where the kernel gives them), small ones from the heap; growing keeps the values; every
// byte is usable.
TEST(Bf16Packed, StacksLargeAndSmallHoldTheirValues) {
  using namespace moe::detail;
  for (size_t n : {size_t{1000}, kHugeAllocMin / 2 + 12345, kHugeAllocMin}) {
    SCOPED_TRACE(n);
    PackedStack s(n);
    if (n * sizeof(uint16_t) >= kHugeAllocMin) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data()) % (size_t{2} << 20), 0u);
    }
    for (size_t i = 0; i < n; ++i) s[i] = static_cast<uint16_t>(i * 2654435761u >> 16);
    s.resize(3 * n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(s[i], static_cast<uint16_t>(i * 2654435761u >> 16));
    std::memset(s.data() + n, 0x5a, 2 * n * sizeof(uint16_t));
    EXPECT_EQ(s.back(), 0x5a5a);
  }
}

// huge_alloc's observer (what `moe bench` counts its mapped buffers by): told each mapping in
// whole huge pages when made and when released, nothing for heap-sized stacks.
namespace {
std::vector<int64_t> g_mapped;
void record_mapped(int64_t bytes) { g_mapped.push_back(bytes); }
}  // namespace

TEST(Bf16Packed, HugeMappingsAreToldToTheObserver) {
  using namespace moe::detail;
  constexpr int64_t kPage = int64_t{2} << 20;
  g_mapped.clear();
  set_huge_observer(&record_mapped);
  {
    PackedStack small(1000);
    EXPECT_TRUE(g_mapped.empty());
    PackedStack big(kHugeAllocMin / sizeof(uint16_t) + 1);  // one byte pair over: 3 pages
    ASSERT_EQ(g_mapped.size(), 1u);
    EXPECT_EQ(g_mapped[0], static_cast<int64_t>(kHugeAllocMin) + kPage);
  }
  set_huge_observer(nullptr);
  ASSERT_EQ(g_mapped.size(), 2u);
  EXPECT_EQ(g_mapped[1], -g_mapped[0]);
  PackedStack unobserved(kHugeAllocMin);
  EXPECT_EQ(g_mapped.size(), 2u);
}

namespace {

// The double sum of the same bf16 operands, for C's row i, column j of B.
double packed_ref(const std::vector<uint16_t>& A, int64_t lda, const std::vector<uint16_t>& B,
                  int64_t ldb, int64_t i, int64_t j, int64_t K) {
  double want = 0.0;
  for (int64_t p = 0; p < K; ++p)
    want += static_cast<double>(moe::detail::from_bf16(A[i * lda + p])) *
            moe::detail::from_bf16(B[p * ldb + j]);
  return want;
}

}  // namespace

// C = A · B[:, n0 : n0 + n] (+ C) against the double sum of the same operands, on the vdpbf16ps
// kernel (where the CPU has it) and on the widened fallback: every row count 1..70 (each row
// block size and remainder), N and K off the panel and pair sizes, column tiles starting at a
// later panel, strides wider than the rows, and nothing written outside the tile.
TEST(Bf16Packed, MatchesTheDoubleSumOfTheSameOperands) {
  using namespace moe::detail;
  Rng rng(12);
  const bool native = packed_bf16_native();
  RecordProperty("packed_kernel", gemm_bf16_packed_impl());
  for (auto [N, K] : {std::pair<int64_t, int64_t>{1, 1}, {63, 17}, {65, 31}, {130, 129},
                      {200, 64}, {64, 2}}) {
    const int64_t Mmax = 70, lda = K + 3, ldb = N;
    std::vector<uint16_t> A(static_cast<size_t>(Mmax * lda)), B(static_cast<size_t>(K * N));
    for (auto& v : A) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    for (auto& v : B) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(K, N)));
    pack_bf16(Bp.data(), B.data(), ldb, 1, K, N);
    for (int64_t n0 : {int64_t{0}, int64_t{64}}) {
      if (n0 >= N) continue;
      const int64_t n = N - n0, ldc = n + 2;
      for (int64_t M = 1; M <= Mmax; ++M)
        for (int path = 0; path < 2; ++path)
          for (float beta : {0.0f, 1.0f}) {
            if (path == 0 && !native) continue;
            SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                         " n0 " + std::to_string(n0) + (path ? " widened" : " native") +
                         " beta " + std::to_string(beta));
            std::vector<float> C(static_cast<size_t>(M * ldc), 0.5f);
            if (path == 0)
              gemm_bf16_packed_serial(M, n0, n, K, A.data(), lda, Bp.data(), beta, C.data(), ldc);
            else
              gemm_bf16_packed_widened(M, n0, n, K, A.data(), lda, Bp.data(), beta, C.data(), ldc);
            for (int64_t i = 0; i < M; ++i) {
              for (int64_t j = 0; j < n; ++j) {
                const double want = beta * 0.5 + packed_ref(A, lda, B, ldb, i, n0 + j, K);
                ASSERT_NEAR(C[i * ldc + j], want, 1e-5 * (1.0 + std::sqrt(static_cast<double>(K))))
                    << i << "," << j;
              }
              ASSERT_EQ(C[i * ldc + n], 0.5f) << "wrote past the tile";
              ASSERT_EQ(C[i * ldc + n + 1], 0.5f) << "wrote past the tile";
            }
          }
    }
  }
}

// Empty operands: no rows or no columns write nothing; K = 0 gives zeros, or keeps C.
TEST(Bf16Packed, EmptyProductsAndEmptyReductions) {
  using namespace moe::detail;
  std::vector<uint16_t> A(8, to_bf16(1.0f)), Bp(static_cast<size_t>(packed_bf16_size(16, 64)), 0);
  std::vector<float> C(8, 0.5f);
  gemm_bf16_packed_serial(0, 0, 4, 16, A.data(), 16, Bp.data(), 0.0f, C.data(), 4);
  gemm_bf16_packed_serial(2, 0, 0, 16, A.data(), 16, Bp.data(), 0.0f, C.data(), 4);
  EXPECT_EQ(C, std::vector<float>(8, 0.5f));
  gemm_bf16_packed_serial(2, 0, 4, 0, A.data(), 16, Bp.data(), 1.0f, C.data(), 4);
  EXPECT_EQ(C, std::vector<float>(8, 0.5f));
  gemm_bf16_packed_serial(2, 0, 4, 0, A.data(), 16, Bp.data(), 0.0f, C.data(), 4);
  EXPECT_EQ(C, std::vector<float>(8, 0.0f));
}

// A row's bits do not depend on the rows sharing its call or on the column tile: the whole
// product equals, bit for bit, rows computed alone, in parts of every size, and by column
// tiles — on the vdpbf16ps kernel (the AMX kernel's twin of this test: test_amx.cpp). The
// dispatch of gemm_bf16_packed_serial picks a kernel by row count where AMX runs, so there the
// bits follow the kernel a row count picks. (The widened fallback promises only thread-count
// independence, not this.)
TEST(Bf16Packed, RowBitsDoNotDependOnTheBlockOrTile) {
  using namespace moe::detail;
  if (!packed_bf16_native()) GTEST_SKIP() << "no AVX512-BF16 here: the widened path runs";
  Rng rng(13);
  const int64_t M = 70, N = 200, K = 259;
  std::vector<uint16_t> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(K * N));
  for (auto& v : A) v = to_bf16(static_cast<float>(rng.sym(1.0)));
  for (auto& v : B) v = to_bf16(static_cast<float>(rng.sym(1.0)));
  std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(K, N)));
  pack_bf16(Bp.data(), B.data(), N, 1, K, N);
  std::vector<float> whole(static_cast<size_t>(M * N));
  gemm_bf16_packed_avx512(M, 0, N, K, A.data(), K, Bp.data(), 0.0f, whole.data(), N);
  for (int64_t part = 1; part <= 13; ++part) {
    std::vector<float> parts(whole.size(), -1.0f);
    for (int64_t m0 = 0; m0 < M; m0 += part)
      for (int64_t n0 : {int64_t{0}, int64_t{64}, int64_t{192}}) {
        const int64_t n = (n0 == 0 ? 64 : n0 == 64 ? 128 : N - 192);
        gemm_bf16_packed_avx512(std::min(part, M - m0), n0, n, K, A.data() + m0 * K, K,
                                Bp.data(), 0.0f, parts.data() + m0 * N + n0, N);
      }
    ASSERT_EQ(std::memcmp(parts.data(), whole.data(), whole.size() * sizeof(float)), 0)
        << "parts of " << part << " rows";
  }
}

namespace {

// The layer in bf16 against the float64 twin on the same rounded operands.
void check_oracle(const moe_test::Case& cs, int64_t T, int64_t d, int64_t E, int64_t F,
                  int64_t Do, int seed, double& worst_y, double& worst_g) {
  MoEConfig cfg = moe_test::config_of(cs, d, E, F, Do, 31 + seed);
  cfg.precision = Precision::bf16;
  moe_test::check_rounded_oracle(cfg, T, 500 + seed, worst_y, worst_g);
}

using Bf16Run = moe_test::LayerRun;
using moe_test::run_layer;

}  // namespace

TEST(LayerBf16, MatchesTheRoundedOperandOracle) {
  int n = 0;
  double worst_y = 0.0, worst_g = 0.0;
  for (const auto& cs : moe_test::all_cases()) {
    if (n++ % 3 != 0) continue;  // a third of the matrix still covers every axis
    SCOPED_TRACE(cs.name());
    check_oracle(cs, 41, 24, cs.k == 1 ? 4 : 5, 40, 19, n, worst_y, worst_g);
    if (::testing::Test::HasFailure()) return;
  }
  // The oracle rounds what the layer rounds: far tighter than bf16's own 2^-9.
  RecordProperty("worst_forward", std::to_string(worst_y));
  RecordProperty("worst_gradient", std::to_string(worst_g));
}

// Few tokens over many experts (most get no rows, the others 1..4), widths on and off the
// packed kernel's panels (64 columns) and tiles (32 rows of K): the packed products with
// empty experts, one-row experts and padded weights, forward and backward.
TEST(LayerBf16, FewRowsPerExpertAndPaddedWidths) {
  double worst_y = 0.0, worst_g = 0.0;
  int seed = 100;
  for (auto kind : {moe::ExpertKind::swiglu, moe::ExpertKind::mlp, moe::ExpertKind::linear_relu})
    for (auto [d, F, Do] : {std::array<int64_t, 3>{64, 128, 64}, {33, 65, 17}, {130, 31, 129}}) {
      moe_test::Case cs{kind, moe::Activation::gelu, 2, std::nullopt, moe::DropPolicy::position,
                        false, moe::Noise::none, moe::NoiseScale::softplus};
      SCOPED_TRACE(cs.name() + " d " + std::to_string(d) + " F " + std::to_string(F) + " Do " +
                   std::to_string(Do));
      check_oracle(cs, 5, d, 24, F, Do, ++seed, worst_y, worst_g);
      if (::testing::Test::HasFailure()) return;
    }
  RecordProperty("worst_forward", std::to_string(worst_y));
  RecordProperty("worst_gradient", std::to_string(worst_g));
}

namespace {

// The same layer (weights from seed) in fp32 and in bf16, forward and backward on T tokens.
struct Fp32AndBf16 {
  Bf16Run a, b;  // fp32, bf16
  std::vector<std::string> names;
  bool same_routing = false;
};
Fp32AndBf16 run_fp32_and_bf16(const MoEConfig& c32, uint64_t seed, int64_t T) {
  MoEConfig c16 = c32;
  c16.precision = Precision::bf16;
  MoELayer L32(c32), L16(c16);
  Rng rng(seed);
  moe_test::randomize(L32, rng);
  for (const auto& name : L32.parameter_names()) L16.param(name).data = L32.param(name).data;
  const auto x = rng.vec(T * c32.d_model, 1.0), dy = rng.vec(T * c32.out_dim(), 1.0);
  moe::ForwardOptions opt;
  Fp32AndBf16 r{run_layer(L32, x, dy, T, opt), run_layer(L16, x, dy, T, opt), L32.parameter_names()};
  r.same_routing = L32.routing().indices == L16.routing().indices;
  return r;
}

}  // namespace

// Rounding as transformers (round_router_logits, round_gate_weights, round_each_op, torch's
// tie order) against the twin, which rounds the same steps (layer/layer_ref.hpp): every
// expert kind, a router that weights before and one that weights after the top-k, forward
// and backward (≤ 1e-3, gradients ≤ 5e-3). Not vacuous: the switches move the twin's own
// output by more than twice that tolerance, so a layer that ignored them would fail.
TEST(LayerBf16, RoundingAsTransformersMatchesTheTwin) {
  double worst_y = 0.0, worst_g = 0.0;
  int seed = 700;
  for (auto kind : {moe::ExpertKind::swiglu, moe::ExpertKind::clamped_swiglu,
                    moe::ExpertKind::mlp, moe::ExpertKind::linear_relu})
    for (auto router : {moe::RouterKind::softmax_topk, moe::RouterKind::topk_softmax}) {
      moe_test::Case cs{kind, moe::Activation::gelu, 2, std::nullopt, moe::DropPolicy::position,
                        false, moe::Noise::none, moe::NoiseScale::softplus};
      MoEConfig cfg = moe_test::config_of(cs, 48, 6, 40, 24, ++seed);
      SCOPED_TRACE(cs.name() + (router == moe::RouterKind::softmax_topk ? " softmax_topk"
                                                                        : " topk_softmax"));
      cfg.precision = Precision::bf16;
      cfg.router_kind = router;
      cfg.renormalize = router == moe::RouterKind::softmax_topk;
      cfg.tie_break = moe::TieBreak::torch;
      cfg.round_router_logits = cfg.round_gate_weights = cfg.round_each_op = true;
      moe_test::check_rounded_oracle(cfg, 33, seed, worst_y, worst_g);
      if (::testing::Test::HasFailure()) return;
      // The twin with and without the switches, on one layer's weights and operands.
      MoELayer L(cfg);
      Rng rng(static_cast<uint64_t>(seed) + 1000);
      moe_test::randomize(L, rng);
      const auto x = moe_test::convert<double>(rng.vec(33 * cfg.d_model, 1.0));
      const auto p = moe::detail::RefParams<double>::from(L);
      MoEConfig plain = cfg;
      plain.tie_break = moe::TieBreak::high;
      plain.round_router_logits = plain.round_gate_weights = plain.round_each_op = false;
      std::vector<double> rounded, unrounded;
      moe::detail::RefSaved<double> sv;
      moe::detail::layer_forward_ref<double>(rounded, sv, x.data(), p, cfg, 33, true, nullptr);
      moe::detail::layer_forward_ref<double>(unrounded, sv, x.data(), p, plain, 33, true, nullptr);
      EXPECT_GT(rel_max_err(rounded, unrounded), 2e-3) << "the switches change too little";
    }
  RecordProperty("worst_forward", std::to_string(worst_y));
  RecordProperty("worst_gradient", std::to_string(worst_g));
}

// Not a tautology: the same layer in fp32 differs by bf16's rounding, within 2e-2 (the
// experts here are smooth: gelu, silu; ReLU's forward only).
TEST(LayerBf16, WithinBf16ToleranceOfFp32) {
  for (auto kind : {moe::ExpertKind::linear_relu, moe::ExpertKind::mlp, moe::ExpertKind::swiglu}) {
    SCOPED_TRACE(moe::to_string(kind));
    moe_test::Case cs{kind, moe::Activation::gelu, 2, std::nullopt, moe::DropPolicy::position,
                      false, moe::Noise::none, moe::NoiseScale::softplus};
    const auto r = run_fp32_and_bf16(moe_test::config_of(cs, 64, 6, 96, 48, 9), 9, 50);
    const Bf16Run &a = r.a, &b = r.b;
    const double ey = rel_max_err(b.y, a.y);
    EXPECT_LE(ey, 2e-2);
    EXPECT_GT(ey, 1e-5) << "bf16 gave fp32's bits: the bf16 path did not run";
    // ReLU's kink: an output within bf16's rounding of zero flips its mask between the two
    // precisions and moves a whole gradient term; the rounding oracle checks those exactly.
    if (kind == moe::ExpertKind::linear_relu) continue;
    EXPECT_LE(rel_max_err(b.dx, a.dx), 2e-2);
    for (size_t i = 0; i < a.grads.size(); ++i)
      EXPECT_LE(rel_max_err(b.grads[i], a.grads[i]), 2e-2) << r.names[i];
  }
}

// The router family, shared experts and expert choice in bf16: against fp32 (their fp32
// paths are checked against their own references elsewhere).
TEST(LayerBf16, RouterFamilySharedExpertsAndExpertChoice) {
  struct Variant {
    const char* name;
    void (*apply)(MoEConfig&);
  };
  const Variant variants[] = {
      {"softmax_topk_renorm", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::softmax_topk;
         c.renormalize = true;
       }},
      {"sigmoid_groups", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::sigmoid;
         c.renormalize = true;
         c.n_groups = 2;
         c.topk_groups = 1;
         c.scaling_factor = 2.5f;
       }},
      {"shared_gated", [](MoEConfig& c) {
         c.n_shared_experts = 2;
         c.shared_gate = true;
       }},
      {"expert_choice", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::expert_choice;
         c.capacity_factor = 1.0;
         c.aux_loss_kind = moe::AuxLossKind::none;
       }},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::silu, 2, std::nullopt,
                      moe::DropPolicy::position, true, moe::Noise::none,
                      moe::NoiseScale::softplus};
    MoEConfig c32 = moe_test::config_of(cs, 32, 4, 48, 32, 17);
    c32.z_alpha = 0.0f;
    v.apply(c32);
    const auto r = run_fp32_and_bf16(c32, 17, 24);
    const Bf16Run &a = r.a, &b = r.b;
    ASSERT_TRUE(r.same_routing) << "the router is fp32 in both";
    EXPECT_LE(rel_max_err(b.y, a.y), 2e-2);
    EXPECT_NE(b.y, a.y);
    EXPECT_LE(rel_max_err(b.dx, a.dx), 2e-2);
    for (size_t i = 0; i < a.grads.size(); ++i)
      EXPECT_LE(rel_max_err(b.grads[i], a.grads[i]), 3e-2) << r.names[i];
  }
}

// The bf16 copies follow the fp32 masters: through param(), after a backward (an optimizer
// writing through pointers it kept), and through weights_changed().
TEST(LayerBf16, CopiesFollowTheMasters) {
  moe_test::Case cs{moe::ExpertKind::mlp, moe::Activation::relu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 16, 4, 32, 16, 3);
  cfg.precision = Precision::bf16;
  MoELayer L(cfg);
  Rng rng(4);
  moe_test::randomize(L, rng);
  const int64_t T = 12;
  const auto x = rng.vec(T * 16, 1.0), dy = rng.vec(T * 16, 1.0);
  moe::ForwardOptions opt;
  opt.training = false;
  std::vector<float> y0(T * 16), y1(T * 16), dx(T * 16);
  L.forward(y0.data(), x.data(), T, opt);
  auto fresh = [&](MoELayer& src) {  // a new layer on the same masters: the truth
    MoELayer M(cfg);
    for (const auto& name : src.parameter_names()) M.param(name).data = std::as_const(src).param(name).data;
    std::vector<float> y(T * 16);
    M.forward(y.data(), x.data(), T, opt);
    return y;
  };
  // 1. Through param().
  for (float& w : L.param("W1").data) w *= 0.5f;
  L.forward(y1.data(), x.data(), T, opt);
  EXPECT_NE(y1, y0);
  EXPECT_EQ(y1, fresh(L));
  // 2. A pointer kept from param(), written after a backward (what an optimizer does).
  float* w2 = L.param("W2").ptr();
  const int64_t n_w2 = std::as_const(L).param("W2").numel();
  opt.training = true;
  L.forward(y1.data(), x.data(), T, opt);
  L.backward(dx.data(), dy.data());
  for (int64_t i = 0; i < n_w2; ++i) w2[i] += 0.25f;
  opt.training = false;
  L.forward(y1.data(), x.data(), T, opt);
  EXPECT_EQ(y1, fresh(L));
  // 3. Written through the kept pointer with neither: weights_changed() says so.
  std::vector<float> y2(T * 16);
  for (int64_t i = 0; i < n_w2; ++i) w2[i] -= 0.5f;
  L.weights_changed();
  L.forward(y2.data(), x.data(), T, opt);
  EXPECT_NE(y2, y1);
  EXPECT_EQ(y2, fresh(L));
}

TEST(LayerBf16, PrecisionNamesAndErrors) {
  EXPECT_EQ(moe::parse_precision("bf16"), Precision::bf16);
  EXPECT_STREQ(moe::to_string(Precision::bf16), "bf16");
  EXPECT_THROW(moe::parse_precision("fp16"), moe::Error);
  MoEConfig c;
  c.d_model = 4;
  c.n_experts = 2;
  c.k = 1;
  c.precision = Precision::int8;
  c.d_ff = int64_t{1} << 17;  // int8's sums would overflow int32
  try {
    c.validate();
    FAIL() << "int8 accepted";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("precision"), std::string::npos) << e.what();
  }
}
