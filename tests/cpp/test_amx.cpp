// The AMX kernels (kernels/amx_tile.hpp, kernels/amx_gemm.hpp) on every machine: the tile
// layer's emulation against the instructions' definitions, each kernel through the emulation
// against the double sum of the same operands (bf16) or the exact integers (int8) over
// blocking, tails, K and row padding and accumulation, row bits independent of the blocking,
// and, where the CPU has AMX, the instructions against the emulation bit for bit.
// The whole layer on the emulated kernels: test_isa_levels.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/bf16.hpp"
#include "common/cpu.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/int8.hpp"
#include "kernels/amx_gemm.hpp"
#include "kernels/amx_tile.hpp"
#include "test_layer_util.hpp"

namespace {

using namespace moe::detail;
using moe_test::Rng;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TileConfig full_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kTileRows;
    c.colsb[t] = kTileBytes;
  }
  return c;
}

// One tdpbf16ps on the emulation: C (16×16 fp32) += A (16 rows × 16 pairs) · B (16 pairs ×
// 16 columns, each dword a pair).
void emu_dpbf16(float C[16][16], const uint16_t A[16][32], const uint16_t B[16][32]) {
  AmxEmu::config(full_tiles());
  AmxEmu::load<0>(C, 64);
  AmxEmu::load<1>(A, 64);
  AmxEmu::load<2>(B, 64);
  AmxEmu::dpbf16ps<0, 1, 2>();
  AmxEmu::store<0>(C, 64);
  AmxEmu::release();
}

}  // namespace

// tdpbf16ps sums the even and the odd elements of the pairs apart over the instruction's K
// and adds them at the end (SDM): C = C + (Σ even + Σ odd). Here the even sum is 2^24 + 1
// (rounds to 2^24, ties to even) and the odd sum 1 + 1 = 2, so C = 2^24 + 2; a pair-by-pair
// sum (vdpbf16ps's order) would give 2^24.
TEST(AmxEmu, Bf16SumsEvenAndOddPairsApart) {
  float C[16][16] = {};
  uint16_t A[16][32] = {}, B[16][32] = {};
  const uint16_t one = to_bf16(1.0f), big = to_bf16(16777216.0f);  // 2^24
  A[0][0] = big;  // pair 0: (2^24, 1)
  A[0][1] = one;
  A[0][2] = one;  // pair 1: (1, 1)
  A[0][3] = one;
  for (int k = 0; k < 2; ++k) B[k][0] = B[k][1] = one;  // column 0: pairs (1, 1)
  emu_dpbf16(C, A, B);
  EXPECT_EQ(C[0][0], 16777218.0f);
  EXPECT_EQ(C[0][1], 0.0f);
  EXPECT_EQ(C[1][0], 0.0f);
}

// Denormal operands read as zero; a result that would be denormal is flushed to zero; the
// products themselves are exact (bf16 × bf16 fits fp32's significand).
TEST(AmxEmu, Bf16DenormalsAreZeroAndResultsFlush) {
  float C[16][16] = {};
  uint16_t A[16][32] = {}, B[16][32] = {};
  A[0][0] = 0x0001;  // the smallest bf16 denormal
  B[0][0] = to_bf16(1.0e30f);
  A[1][0] = to_bf16(1.0e-20f);  // 1e-20 · 1e-20 = 1e-40: an fp32 denormal
  B[0][2] = to_bf16(1.0e-20f);
  A[2][0] = to_bf16(3.0f);
  B[0][4] = to_bf16(-5.0f);
  C[3][3] = from_bits(0x00000010u);  // a denormal accumulator reads as zero
  emu_dpbf16(C, A, B);
  EXPECT_EQ(bits(C[0][0]), 0u);
  EXPECT_EQ(C[1][1], 0.0f);
  EXPECT_EQ(C[2][2], -15.0f);
  EXPECT_EQ(bits(C[3][3]), 0u);
}

// tdpbusd: unsigned bytes of A times signed bytes of B, four to a dword, summed into C in
// 32-bit arithmetic that wraps; a load of fewer rows or bytes than the tile zeroes the rest.
TEST(AmxEmu, U8S8SumsExactlyAndPartialLoadsZeroTheRest) {
  Rng rng(5);
  alignas(64) uint8_t A[16][64];
  alignas(64) int8_t B[16][64];
  alignas(64) int32_t C[16][16];
  for (auto& r : A)
    for (auto& v : r) v = static_cast<uint8_t>(rng.below(256));
  for (auto& r : B)
    for (auto& v : r) v = static_cast<int8_t>(rng.below(256) - 128);
  for (auto& r : C)
    for (auto& v : r) v = static_cast<int32_t>(rng.below(int64_t{1} << 32) - (int64_t{1} << 31));
  C[0][0] = std::numeric_limits<int32_t>::max();
  int32_t want[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      uint32_t acc = static_cast<uint32_t>(C[m][n]);
      for (int k = 0; k < 64; ++k) acc += static_cast<uint32_t>(A[m][k] * B[k / 4][4 * n + k % 4]);
      want[m][n] = static_cast<int32_t>(acc);
    }
  AmxEmu::config(full_tiles());
  AmxEmu::load<3>(C, 64);
  AmxEmu::load<4>(A, 64);
  AmxEmu::load<5>(B, 64);
  AmxEmu::dpbusd<3, 4, 5>();
  AmxEmu::store<3>(C, 64);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) ASSERT_EQ(C[m][n], want[m][n]) << m << "," << n;
  TileConfig part = full_tiles();
  part.rows[0] = 3;
  part.colsb[0] = 8;
  AmxEmu::config(part);
  alignas(64) uint8_t ones[16][64];
  std::memset(ones, 0xff, sizeof(ones));
  AmxEmu::load<0>(ones, 64);
  part.rows[0] = 16;
  part.colsb[0] = 64;
  alignas(64) uint8_t out[16][64];
  std::memcpy(AmxEmu::state().cfg.rows, part.rows, sizeof(part.rows));
  std::memcpy(AmxEmu::state().cfg.colsb, part.colsb, sizeof(part.colsb));
  AmxEmu::store<0>(out, 64);
  for (int r = 0; r < 16; ++r)
    for (int b = 0; b < 64; ++b) ASSERT_EQ(out[r][b], r < 3 && b < 8 ? 0xff : 0) << r << "," << b;
  AmxEmu::release();
}

namespace {

struct Bf16Case {
  int64_t M, N, K;
};

// The double sum of the bf16 operands (A row i, B column j).
double dot(const std::vector<uint16_t>& A, int64_t lda, const std::vector<uint16_t>& B, int64_t N,
           int64_t i, int64_t j, int64_t K) {
  double s = 0.0;
  for (int64_t p = 0; p < K; ++p)
    s += static_cast<double>(from_bf16(A[i * lda + p])) * from_bf16(B[p * N + j]);
  return s;
}

}  // namespace

// The AMX bf16 kernel (emulated) against the double sum of the same operands: rows 1…70
// (wide blocks of ≤ 16 rows, square blocks of 32, the K-blocked path above 32 rows, partial
// tiles), N off the panel and the 16-column tile, K off the 32-value tile, column tiles from
// a later panel, A's stride wider than its rows, beta 0 and 1, nothing written outside the
// tile.
TEST(AmxBf16, EmulatedMatchesTheDoubleSumOfTheSameOperands) {
  Rng rng(21);
  for (auto [N, K] : {std::pair<int64_t, int64_t>{1, 1}, {17, 31}, {63, 32}, {65, 33},
                      {130, 129}, {200, 64}, {64, 600}}) {
    const int64_t Mmax = 70, lda = K + 5;
    std::vector<uint16_t> A(static_cast<size_t>(Mmax * lda)), B(static_cast<size_t>(K * N));
    for (auto& v : A) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    for (auto& v : B) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    // Garbage beyond K in A's stride: the kernel must not let it in (NaN × 0 = NaN).
    for (int64_t i = 0; i < Mmax; ++i)
      for (int64_t p = K; p < lda; ++p) A[i * lda + p] = 0x7fc0;
    std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(K, N)));
    pack_bf16(Bp.data(), B.data(), N, 1, K, N);
    for (int64_t n0 : {int64_t{0}, int64_t{64}}) {
      if (n0 >= N) continue;
      const int64_t n = N - n0, ldc = n + 2;
      for (int64_t M : {1, 2, 5, 15, 16, 17, 31, 32, 33, 47, 48, 64, 70})
        for (float beta : {0.0f, 1.0f}) {
          SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                       " n0 " + std::to_string(n0) + " beta " + std::to_string(beta));
          std::vector<float> C(static_cast<size_t>(M * ldc), 0.5f);
          gemm_bf16_packed_amx(true, M, n0, n, K, A.data(), lda, Bp.data(), beta, C.data(), ldc);
          for (int64_t i = 0; i < M; ++i) {
            for (int64_t j = 0; j < n; ++j) {
              const double want = beta * 0.5 + dot(A, lda, B, N, i, n0 + j, K);
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

// A row's bits do not depend on the rows that share its call (wide, square or K-blocked
// paths, in place or copied) or on the column tile: the whole product equals, bit for bit,
// the rows computed in parts of every size and by column tiles.
TEST(AmxBf16, RowBitsDoNotDependOnTheBlockOrTile) {
  Rng rng(22);
  const int64_t M = 70, N = 200, K = 600;
  for (int64_t kk : {K, K - 7}) {  // K whole tiles (A read in place) and not (copied)
    std::vector<uint16_t> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(kk * N));
    for (auto& v : A) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    for (auto& v : B) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(kk, N)));
    pack_bf16(Bp.data(), B.data(), N, 1, kk, N);
    std::vector<float> whole(static_cast<size_t>(M * N));
    gemm_bf16_packed_amx(true, M, 0, N, kk, A.data(), K, Bp.data(), 0.0f, whole.data(), N);
    for (int64_t part : {1, 3, 16, 17, 32, 33, 40}) {
      std::vector<float> parts(whole.size(), -1.0f);
      for (int64_t m0 = 0; m0 < M; m0 += part)
        for (int64_t n0 : {int64_t{0}, int64_t{64}, int64_t{192}}) {
          const int64_t n = (n0 == 0 ? 64 : n0 == 64 ? 128 : N - 192);
          gemm_bf16_packed_amx(true, std::min(part, M - m0), n0, n, kk, A.data() + m0 * K, K,
                               Bp.data(), 0.0f, parts.data() + m0 * N + n0, N);
        }
      for (size_t i = 0; i < whole.size(); ++i)
        ASSERT_EQ(bits(parts[i]), bits(whole[i])) << "K " << kk << " part " << part << " at " << i;
    }
  }
}

// Non-finite operands propagate as in any product: a NaN or an infinity in A reaches its
// row's outputs and no other row's.
TEST(AmxBf16, NonFiniteOperandsStayInTheirRows) {
  const int64_t M = 20, N = 64, K = 64;
  std::vector<uint16_t> A(static_cast<size_t>(M * K), to_bf16(0.5f)), B(static_cast<size_t>(K * N), to_bf16(0.25f));
  A[3 * K + 10] = 0x7fc0;                         // NaN in row 3
  A[18 * K + 2] = to_bf16(std::numeric_limits<float>::infinity());  // +inf in row 18
  std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(K, N)));
  pack_bf16(Bp.data(), B.data(), N, 1, K, N);
  std::vector<float> C(static_cast<size_t>(M * N));
  gemm_bf16_packed_amx(true, M, 0, N, K, A.data(), K, Bp.data(), 0.0f, C.data(), N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      if (i == 3)
        ASSERT_TRUE(std::isnan(C[i * N + j]));
      else if (i == 18)
        ASSERT_EQ(C[i * N + j], std::numeric_limits<float>::infinity());
      else
        ASSERT_EQ(C[i * N + j], 8.0f);  // 64 · 0.5 · 0.25
    }
}

namespace {

// Quantized rows (u8 = q + 128, padded with 128) and an int8 stack of random weights.
struct Int8Operands {
  Int8Stack B;
  std::vector<uint8_t> A;
  std::vector<float> a_scale;
  int64_t lda = 0;
  Int8Operands(int64_t M, int64_t K, int64_t N, uint64_t seed) {
    Rng rng(seed);
    B.resize(2, K, N);
    std::vector<float> W(static_cast<size_t>(K * N));
    for (int64_t e = 0; e < 2; ++e) {
      for (auto& v : W) v = static_cast<float>(rng.sym(1.0));
      B.assign(e, W.data());
    }
    lda = B.K4 * 4;
    std::vector<float> x(static_cast<size_t>(M * K));
    for (auto& v : x) v = static_cast<float>(rng.sym(2.0));
    A.resize(static_cast<size_t>(M * lda));
    a_scale.resize(static_cast<size_t>(M));
    quantize_rows_u8(A.data(), lda, a_scale.data(), x.data(), K, M, K);
  }
};

}  // namespace

// The int8 products on the emulated AMX kernel give the same bits as on the VNNI or portable
// kernel (exact int32 sums), over rows 1…70, K off the 64-byte tile and N off the panel.
TEST(AmxInt8, EmulatedGivesTheBitsOfTheOtherKernels) {
  for (auto [K, N] : {std::pair<int64_t, int64_t>{1, 1}, {63, 17}, {64, 64}, {65, 130},
                      {300, 200}}) {
    for (int64_t M : {1, 4, 15, 16, 17, 33, 70}) {
      SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N));
      Int8Operands op(M, K, N, 31 + M);
      std::vector<float> base(static_cast<size_t>(M * N)), amx(base.size());
      gemm_u8s8_expert(base.data(), N, op.A.data(), op.lda, op.a_scale.data(), M, op.B, 1);
      {
        IsaOverride emulate(cpu().level, true);
        gemm_u8s8_expert(amx.data(), N, op.A.data(), op.lda, op.a_scale.data(), M, op.B, 1);
      }
      for (size_t i = 0; i < base.size(); ++i) ASSERT_EQ(bits(amx[i]), bits(base[i])) << i;
    }
  }
}

// Where the CPU has AMX: the instructions give the emulation's bits, for bf16 and int8, over
// the blocking paths and tails above. Elsewhere this is skipped with the reason; the
// emulation itself is tested above on every machine.
TEST(AmxHardware, InstructionsMatchTheEmulationBitForBit) {
  if (cpu().best != Isa::amx)
    GTEST_SKIP() << "no AMX on this CPU (" << cpu().model << "): the instructions cannot run here";
  Rng rng(41);
  for (auto [N, K] : {std::pair<int64_t, int64_t>{17, 31}, {130, 129}, {200, 600}}) {
    const int64_t M = 70, lda = K + 3;
    std::vector<uint16_t> A(static_cast<size_t>(M * lda)), B(static_cast<size_t>(K * N));
    for (auto& v : A) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    for (auto& v : B) v = to_bf16(static_cast<float>(rng.sym(1.0)));
    std::vector<uint16_t> Bp(static_cast<size_t>(packed_bf16_size(K, N)));
    pack_bf16(Bp.data(), B.data(), N, 1, K, N);
    for (int64_t rows : {1, 16, 17, 32, 70})
      for (float beta : {0.0f, 1.0f}) {
        std::vector<float> hw(static_cast<size_t>(rows * N), 0.25f), emu(hw);
        gemm_bf16_packed_amx(false, rows, 0, N, K, A.data(), lda, Bp.data(), beta, hw.data(), N);
        gemm_bf16_packed_amx(true, rows, 0, N, K, A.data(), lda, Bp.data(), beta, emu.data(), N);
        for (size_t i = 0; i < hw.size(); ++i)
          ASSERT_EQ(bits(hw[i]), bits(emu[i])) << "bf16 " << rows << "x" << N << "x" << K << " at " << i;
      }
    Int8Operands op(70, K, N, 43);
    std::vector<float> hw(static_cast<size_t>(70 * N)), emu(hw.size());
    {
      IsaOverride real(Isa::amx, false);
      gemm_u8s8_expert(hw.data(), N, op.A.data(), op.lda, op.a_scale.data(), 70, op.B, 0);
    }
    {
      IsaOverride emulated(Isa::amx, true);
      gemm_u8s8_expert(emu.data(), N, op.A.data(), op.lda, op.a_scale.data(), 70, op.B, 0);
    }
    for (size_t i = 0; i < hw.size(); ++i) ASSERT_EQ(bits(hw[i]), bits(emu[i])) << "int8 at " << i;
  }
}
