// The grouped GEMM with tile epilogues on shapes larger than one tile (1024×1024), which the
// layer tests' small shapes never reach: against a naive product with the epilogue applied
// after it, and bit-identical with 1 and 2 threads. Shapes are off the tile on purpose.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "experts/activation.hpp"
#include "common/bf16.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/grouped_gemm.hpp"

namespace {

using moe::Activation;
using moe::detail::GemmProblem;
using moe::detail::GroupedGemm;
using moe::detail::KernelBf16Packed;
using moe::detail::KernelF32;
using Op = moe::detail::TileEpilogue::Op;

std::vector<float> values(int64_t n, uint32_t salt) {
  std::vector<float> v(static_cast<size_t>(n));
  uint32_t h = salt;
  for (auto& x : v) {
    h = h * 1664525u + 1013904223u;
    x = static_cast<float>(h >> 8) / 8388608.0f - 1.0f;
  }
  return v;
}

struct Case {
  int64_t M, N, K;
  Op op;
  Activation act;
};

struct Output {
  std::vector<float> C, out;
};

Output run(const Case& c, const std::vector<float>& A, const std::vector<float>& B,
           const std::vector<float>& bias, int threads) {
  Output o{std::vector<float>(static_cast<size_t>(c.M * c.N), 7.0f),
           std::vector<float>(static_cast<size_t>(c.M * c.N), 7.0f)};
  GemmProblem<KernelF32> p;
  p.M = c.M;
  p.N = c.N;
  p.K = c.K;
  p.a = {A.data(), c.K, false};
  p.b = {B.data(), c.N, false};
  p.C = o.C.data();
  p.ldc = c.N;
  p.epi.op = c.op;
  p.epi.act = c.act;
  p.epi.bias = bias.data();
  p.epi.out = o.out.data();
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  GroupedGemm gg;
  gg.add(p);
  gg.run();
  omp_set_num_threads(saved);
  return o;
}

class GroupedGemmEpilogue : public ::testing::TestWithParam<Case> {};

TEST_P(GroupedGemmEpilogue, MatchesNaiveAndIsBitIdenticalAcrossThreads) {
  const Case c = GetParam();
  const auto A = values(c.M * c.K, 1), B = values(c.K * c.N, 2), bias = values(c.N, 3);
  const Output one = run(c, A, B, bias, 1), two = run(c, A, B, bias, 2);
  ASSERT_EQ(one.C, two.C) << "C differs between 1 and 2 threads";
  ASSERT_EQ(one.out, two.out) << "out differs between 1 and 2 threads";
  int64_t nonzero = 0;
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < c.N; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < c.K; ++k) s += double(A[i * c.K + k]) * double(B[k * c.N + j]);
      const auto z = static_cast<float>(s + bias[j]);
      const size_t at = static_cast<size_t>(i * c.N + j);
      const float tol = 1e-5f + 1e-5f * std::fabs(z) * static_cast<float>(c.K);
      switch (c.op) {
        case Op::bias:
          ASSERT_NEAR(one.C[at], z, tol) << i << "," << j;
          ASSERT_EQ(one.out[at], 7.0f);  // untouched
          break;
        case Op::bias_act:
          ASSERT_NEAR(one.C[at], z, tol) << i << "," << j;
          ASSERT_EQ(one.out[at], moe::detail::act_forward(c.act, one.C[at])) << i << "," << j;
          break;
        case Op::bias_act_inplace:
          ASSERT_NEAR(one.C[at], moe::detail::act_forward(c.act, z), 2 * tol) << i << "," << j;
          break;
        case Op::none:
        case Op::glu:  // a pair: GroupedGemm.PairsWriteTheGatedHidden
          break;
      }
      nonzero += one.C[at] != 0.0f;
    }
  EXPECT_GT(nonzero, c.M * c.N / 4);  // not passing on zeros
}

INSTANTIATE_TEST_SUITE_P(
    PastOneTile, GroupedGemmEpilogue,
    ::testing::Values(Case{1100, 1030, 19, Op::bias_act, Activation::relu},
                      Case{37, 2100, 23, Op::bias_act, Activation::gelu},
                      Case{1030, 1025, 7, Op::bias_act_inplace, Activation::relu},
                      Case{2050, 9, 5, Op::bias, Activation::relu}));

// bf16 operands against a packed weight through the same tiles and epilogues: rows past one
// 512-row tile, columns past one 2048-column tile; the epilogue also writes act(C) rounded to
// bf16.
TEST(GroupedGemm, Bf16ProblemsWithTheirEpilogue) {
  const int64_t M = 530, N = 2100, K = 19;
  const auto A = values(M * K, 6), B = values(K * N, 7), bias = values(N, 8);
  std::vector<uint16_t> Ab(A.size()), Bb(B.size()), hb(static_cast<size_t>(M * N));
  for (size_t i = 0; i < A.size(); ++i) Ab[i] = moe::detail::to_bf16(A[i]);
  for (size_t i = 0; i < B.size(); ++i) Bb[i] = moe::detail::to_bf16(B[i]);
  std::vector<uint16_t> Bp(static_cast<size_t>(KernelBf16Packed::weight_size(K, N)));
  moe::detail::pack_bf16(Bp.data(), Bb.data(), N, 1, K, N);
  std::vector<float> C(static_cast<size_t>(M * N));
  GemmProblem<KernelBf16Packed> p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a = {Ab.data(), K};
  p.b = Bp.data();
  p.C = C.data();
  p.ldc = N;
  p.epi.op = Op::bias_act;
  p.epi.act = Activation::gelu;
  p.epi.bias = bias.data();
  p.epi.out_bf16 = hb.data();
  GroupedGemm gg;
  gg.add(p);
  gg.run();
  int64_t nonzero = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double z = bias[static_cast<size_t>(j)];
      for (int64_t q = 0; q < K; ++q)
        z += static_cast<double>(moe::detail::from_bf16(Ab[static_cast<size_t>(i * K + q)])) *
             moe::detail::from_bf16(Bb[static_cast<size_t>(q * N + j)]);
      const float c = C[static_cast<size_t>(i * N + j)];
      ASSERT_NEAR(c, z, 1e-4 * (1.0 + std::abs(z))) << i << "," << j;
      ASSERT_EQ(hb[static_cast<size_t>(i * N + j)],
                moe::detail::to_bf16(moe::detail::act_forward(Activation::gelu, c)));
      nonzero += c != 0.0f;
    }
  EXPECT_GT(nonzero, M * N / 2);
}

// A pair (the gated experts' W1 and W3) with the glu epilogue, past one tile in rows and
// columns, fp32 and packed bf16, swiglu and clamped_swiglu with biases: C and C2 are the two
// products (+ biases), the hidden values are exactly silu(C)·C2 / clamped_swiglu(C, C2) of
// them (rounded to bf16 in bf16), and 1 and 2 threads give the same bits.
TEST(GroupedGemm, PairsWriteTheGatedHidden) {
  for (bool bf16 : {false, true})
    for (bool clamped : {false, true}) {
      SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + (clamped ? " clamped" : ""));
      const int64_t M = bf16 ? 530 : 1030, N = bf16 ? 2100 : 1050, K = 37;
      const auto A = values(M * K, 11), B = values(K * N, 12), B2 = values(K * N, 13),
                 b1 = values(N, 14), b3 = values(N, 15);
      std::vector<uint16_t> Ab(A.size()), Bp(static_cast<size_t>(moe::detail::packed_bf16_size(K, N))),
          Bp2(Bp.size());
      for (size_t i = 0; i < A.size(); ++i) Ab[i] = moe::detail::to_bf16(A[i]);
      moe::detail::pack_bf16(Bp.data(), B.data(), N, 1, K, N);
      moe::detail::pack_bf16(Bp2.data(), B2.data(), N, 1, K, N);
      std::vector<float> results[2][3];  // [threads][C, C2, hid as float]
      for (int threads = 1; threads <= 2; ++threads) {
        std::vector<float> C(static_cast<size_t>(M * N)), C2(C.size()), h(C.size(), 7.0f);
        std::vector<uint16_t> hb(C.size(), 0);
        moe::detail::TileEpilogue epi;
        epi.op = Op::glu;
        epi.clamped = clamped;
        epi.alpha = 1.5f;
        epi.limit = 0.75f;
        if (clamped) {
          epi.bias = b1.data();
          epi.bias2 = b3.data();
        }
        GroupedGemm gg;
        if (bf16) {
          GemmProblem<KernelBf16Packed> p;
          p.a = {Ab.data(), K};
          p.b = Bp.data();
          p.b2 = Bp2.data();
          epi.out_bf16 = hb.data();
          p.M = M, p.N = N, p.K = K, p.C = C.data(), p.C2 = C2.data(), p.ldc = N, p.epi = epi;
          gg.add(p);
        } else {
          GemmProblem<KernelF32> p;
          p.a = {A.data(), K, false};
          p.b = {B.data(), N, false};
          p.b2 = {B2.data(), N, false};
          epi.out = h.data();
          p.M = M, p.N = N, p.K = K, p.C = C.data(), p.C2 = C2.data(), p.ldc = N, p.epi = epi;
          gg.add(p);
        }
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        gg.run();
        omp_set_num_threads(saved);
        if (bf16)
          for (size_t i = 0; i < h.size(); ++i) h[i] = moe::detail::from_bf16(hb[i]);
        results[threads - 1][0] = C;
        results[threads - 1][1] = C2;
        results[threads - 1][2] = h;
      }
      for (int i = 0; i < 3; ++i) ASSERT_EQ(results[0][i], results[1][i]) << "1 and 2 threads, output " << i;
      const auto &C = results[0][0], &C2 = results[0][1], &h = results[0][2];
      int64_t nonzero = 0;
      for (int64_t i = 0; i < M; i += 7)
        for (int64_t j = 0; j < N; ++j) {
          const size_t at = static_cast<size_t>(i * N + j);
          double z1 = clamped ? b1[j] : 0.0, z3 = clamped ? b3[j] : 0.0;
          for (int64_t q = 0; q < K; ++q) {
            const double a = bf16 ? moe::detail::round_bf16(A[i * K + q]) : A[i * K + q];
            z1 += a * (bf16 ? moe::detail::round_bf16(B[q * N + j]) : B[q * N + j]);
            z3 += a * (bf16 ? moe::detail::round_bf16(B2[q * N + j]) : B2[q * N + j]);
          }
          ASSERT_NEAR(C[at], z1, 1e-4 * (1.0 + std::abs(z1))) << i << "," << j;
          ASSERT_NEAR(C2[at], z3, 1e-4 * (1.0 + std::abs(z3))) << i << "," << j;
          float want = clamped ? moe::detail::clamped_swiglu_f32(C[at], C2[at], 1.5f, 0.75f)
                               : moe::detail::silu_f32(C[at]) * C2[at];
          if (bf16) want = moe::detail::round_bf16(want);
          ASSERT_EQ(h[at], want) << i << "," << j;
          nonzero += h[at] != 0.0f;
        }
      EXPECT_GT(nonzero, M / 7 * N / 2);
    }
}

}  // namespace
