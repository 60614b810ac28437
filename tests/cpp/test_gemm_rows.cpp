// gemm_f32's row independence (common/gemm.hpp): a row of C has the same bits whether the
// rows of A are multiplied all at once or in parts of any size. Expert parallelism relies on
// it: each rank routes its own slice of the batch and must get the router logits (and the
// router's dx) that the whole batch would get.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/gemm.hpp"

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
