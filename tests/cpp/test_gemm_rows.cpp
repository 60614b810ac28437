// gemm_f32's row independence (common/gemm.hpp): a row of C has the same bits whether the
// rows of A are multiplied all at once or in parts of any size. Expert parallelism relies on
// it: each rank routes its own slice of the batch and must get the router logits (and the
// router's dx) that the whole batch would get.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <omp.h>

#include "common/cpu.hpp"
#include "common/gemm.hpp"
#include "router/router_rows.hpp"

namespace {

std::vector<float> rand_vec(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

struct Shape {
  int64_t M, N, K;
  bool trans_b;
  float beta;
};

class GemmRows : public ::testing::TestWithParam<Shape> {};

TEST_P(GemmRows, PartsGiveTheSameBitsAsTheWhole) {
  const Shape s = GetParam();
  const auto A = rand_vec(static_cast<size_t>(s.M * s.K), 1);
  const auto B = rand_vec(static_cast<size_t>(s.K * s.N), 2);
  const auto C0 = rand_vec(static_cast<size_t>(s.M * s.N), 3);
  const int64_t ldb = s.trans_b ? s.K : s.N;
  std::vector<float> whole = C0;
  moe::detail::gemm_f32(false, s.trans_b, s.M, s.N, s.K, 1.0f, A.data(), s.K, B.data(), ldb,
                        s.beta, whole.data(), s.N);
  // Against the plain loops: right, not only repeatable.
  std::vector<float> ref = C0;
  moe::detail::gemm_ref<float>(false, s.trans_b, s.M, s.N, s.K, 1.0f, A.data(), s.K, B.data(),
                               ldb, s.beta, ref.data(), s.N);
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(whole[i], ref[i], 1e-5f * (1.0f + std::abs(ref[i])) * static_cast<float>(s.K))
        << "element " << i;
  // Uneven parts, as ranks of different sizes would hold them.
  for (int64_t part : {1, 3, 7, 50, 64, 65, 100}) {
    std::vector<float> split = C0;
    for (int64_t lo = 0; lo < s.M; lo += part) {
      const int64_t m = std::min(part, s.M - lo);
      moe::detail::gemm_f32(false, s.trans_b, m, s.N, s.K, 1.0f, A.data() + lo * s.K, s.K,
                            B.data(), ldb, s.beta, split.data() + lo * s.N, s.N);
    }
    ASSERT_EQ(0, std::memcmp(split.data(), whole.data(), whole.size() * sizeof(float)))
        << "parts of " << part << " rows differ from the whole batch";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmRows,
                         ::testing::Values(Shape{13, 16, 12, false, 0.0f},
                                           Shape{150, 8, 33, false, 0.0f},
                                           Shape{70, 300, 64, true, 0.0f},
                                           Shape{200, 24, 256, false, 0.0f}, Shape{200, 24, 256, false, 0.5f}, Shape{130, 24, 12, false, 0.5f},
                                           Shape{5, 600, 17, true, 1.0f}));

}  // namespace

// The router's product (router/router_rows.hpp: gemm_f32_rows): each element is the fp32 fma
// chain over K in order, from 0 — bit for bit against that chain written as plain loops, on
// the AVX2 and the AVX-512 path, for 1, 2 and 3 threads, and a row alone against the batch.
TEST(RouterGemm, EveryElementIsTheFmaChainInOrderOnEveryPathAndSplit) {
  struct Case {
    int64_t T, d, N;
  };
  const Case cases[] = {{1, 2048, 128}, {1, 7, 5},   {3, 300, 17},  {13, 257, 64},
                        {50, 65, 200},  {97, 513, 33}, {6, 1, 16},  {200, 40, 130}};
  const int saved = omp_get_max_threads();
  for (const Case& c : cases) {
    const auto x = rand_vec(static_cast<size_t>(c.T * c.d), 11);
    const auto B = rand_vec(static_cast<size_t>(c.d * c.N), 12);
    std::vector<float> want(static_cast<size_t>(c.T * c.N));
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < c.N; ++j) {
        float acc = 0.0f;
        for (int64_t i = 0; i < c.d; ++i) acc = std::fma(x[t * c.d + i], B[i * c.N + j], acc);
        want[t * c.N + j] = acc;
      }
    for (moe::detail::Isa level : {moe::detail::Isa::avx2, moe::detail::Isa::avx512}) {
      if (static_cast<int>(level) > static_cast<int>(moe::detail::cpu().best)) continue;
      moe::detail::IsaOverride at(level, false);
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        // Padding columns past N (ldc > N) stay as they were.
        const int64_t ldc = c.N + 3;
        std::vector<float> got(static_cast<size_t>(c.T * ldc), -7.0f);
        moe::detail::gemm_f32_rows(got.data(), ldc, x.data(), B.data(), c.T, c.d, c.N);
        for (int64_t t = 0; t < c.T; ++t) {
          ASSERT_EQ(0, std::memcmp(&got[t * ldc], &want[t * c.N], c.N * sizeof(float)))
              << "T " << c.T << " d " << c.d << " N " << c.N << " row " << t << " level "
              << static_cast<int>(level) << " threads " << threads;
          for (int64_t j = c.N; j < ldc; ++j) ASSERT_EQ(got[t * ldc + j], -7.0f);
        }
        // The last row alone.
        std::vector<float> one(static_cast<size_t>(c.N));
        moe::detail::gemm_f32_rows(one.data(), c.N, x.data() + (c.T - 1) * c.d, B.data(), 1, c.d,
                                   c.N);
        ASSERT_EQ(0, std::memcmp(one.data(), &want[(c.T - 1) * c.N], c.N * sizeof(float)));
      }
    }
  }
  omp_set_num_threads(saved);
}
