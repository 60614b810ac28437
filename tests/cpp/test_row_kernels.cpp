// The router's selection kernels (src/router/row_kernels.hpp) against a stable sort: every E
// from 1 to 300 and past the vector path's 4096, k from 1 to E, both tie orders, rows full of
// ties, rows with -inf (masked experts), row strides, batches that are not a multiple of the
// lockstep group, and the copy variant's finiteness check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "router/row_kernels.hpp"

namespace {

// The k best of one row by SPEC §1's order: value descending, ties by index (low or high).
void sorted_topk(std::vector<int32_t>& idx, std::vector<float>& val, const float* row,
                 int64_t E, int64_t k, bool high) {
  std::vector<int32_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    if (row[a] != row[b]) return row[a] > row[b];
    return high ? a > b : a < b;
  });
  idx.assign(order.begin(), order.begin() + k);
  val.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) val[static_cast<size_t>(j)] = row[idx[static_cast<size_t>(j)]];
}

// n rows with stride ld; kind 0: distinct normals, 1: few distinct values (ties everywhere),
// 2: normals with about a third of the experts at -inf (k finite ones kept).
std::vector<float> make_rows(std::mt19937& rng, int64_t n, int64_t ld, int64_t E, int64_t k,
                             int kind) {
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> few(0, 3);
  std::vector<float> rows(static_cast<size_t>(n * ld), 12345.0f);  // padding must not be read
  for (int64_t r = 0; r < n; ++r) {
    float* row = &rows[static_cast<size_t>(r * ld)];
    for (int64_t e = 0; e < E; ++e) row[e] = kind == 1 ? static_cast<float>(few(rng)) : nd(rng);
    if (kind == 2) {
      int64_t masked = 0;
      for (int64_t e = 0; e < E && E - masked > k; ++e)
        if (few(rng) == 0) {
          row[e] = -INFINITY;
          ++masked;
        }
    }
  }
  return rows;
}

void check(int64_t n, int64_t E, int64_t k, int kind, bool high, int64_t pad, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t ld = E + pad;
  const auto rows = make_rows(rng, n, ld, E, k, kind);
  std::vector<int32_t> idx(static_cast<size_t>(n * k), -7), idx_c = idx;
  std::vector<float> val(static_cast<size_t>(n * k)), val_c = val;
  moe::detail::topk_rows_f32(idx.data(), val.data(), rows.data(), ld, n, E, k, high);
  const int64_t bad = moe::detail::check_topk_rows_f32(idx_c.data(), val_c.data(), rows.data(),
                                                       ld, n, E, k, high);
  ASSERT_EQ(bad, kind == 2 ? bad : -1);  // -inf is not finite: the checking variant refuses it
  std::vector<int32_t> want_i;
  std::vector<float> want_v;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = &rows[static_cast<size_t>(r * ld)];
    sorted_topk(want_i, want_v, row, E, k, high);
    for (int64_t j = 0; j < k; ++j) {
      const size_t a = static_cast<size_t>(r * k + j);
      ASSERT_EQ(idx[a], want_i[static_cast<size_t>(j)])
          << "E=" << E << " k=" << k << " kind=" << kind << " high=" << high << " row " << r
          << " rank " << j;
      ASSERT_EQ(val[a], want_v[static_cast<size_t>(j)]);
      if (kind != 2) {
        ASSERT_EQ(idx_c[a], want_i[static_cast<size_t>(j)]) << "checking variant, E=" << E;
        ASSERT_EQ(val_c[a], want_v[static_cast<size_t>(j)]);
      }
    }
  }
}

TEST(TopkRows, EveryWidthAndKAgainstStableSort) {
  uint32_t seed = 1;
  for (int64_t E = 1; E <= 300; ++E) {
    std::vector<int64_t> ks = {1, 2, 3, 8, 16, 17, E / 2, E - 1, E};
    for (int64_t k : ks) {
      if (k < 1 || k > E) continue;
      for (int kind = 0; kind < 3; ++kind)
        for (bool high : {false, true}) check(/*n=*/7, E, k, kind, high, E % 3, seed++);
    }
  }
}

TEST(TopkRows, WideRowsAndThePortablePath) {
  uint32_t seed = 99;
  for (int64_t E : {257, 1000, 1024, 4096, 4097, 5000})
    for (int64_t k : {1, 2, 8, 40})
      for (int kind = 0; kind < 3; ++kind)
        for (bool high : {false, true}) check(/*n=*/3, E, k, kind, high, 1, seed++);
}

TEST(TopkRows, CheckingVariantNamesTheFirstNonFiniteRow) {
  for (int64_t E : {5, 16, 64, 256, 1000, 5000}) {
    const int64_t n = 11, k = 2;
    for (float badv : {NAN, INFINITY, -INFINITY}) {
      std::mt19937 rng(static_cast<uint32_t>(E));
      auto rows = make_rows(rng, n, E, E, k, 0);
      rows[static_cast<size_t>(9 * E + E / 2)] = badv;
      rows[static_cast<size_t>(6 * E + E - 1)] = badv;
      std::vector<int32_t> idx(static_cast<size_t>(n * k));
      std::vector<float> val(static_cast<size_t>(n * k));
      EXPECT_EQ(moe::detail::check_topk_rows_f32(idx.data(), val.data(), rows.data(), E, n, E, k,
                                                 false),
                6)
          << "E=" << E << " bad value " << badv;
    }
  }
}

TEST(TopkRows, KeptSoftmaxMatchesTheFormula) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (int64_t k = 1; k <= 40; ++k) {
    std::vector<float> v(static_cast<size_t>(k)), w(static_cast<size_t>(k));
    for (auto& x : v) x = nd(rng);
    std::sort(v.begin(), v.end(), std::greater<>());
    moe::detail::softmax_kept_f32(w.data(), v.data(), k);
    double sum = 0;
    for (float x : v) sum += std::exp(double(x) - v[0]);
    for (int64_t j = 0; j < k; ++j) {
      const double want = std::exp(double(v[static_cast<size_t>(j)]) - v[0]) / sum;
      EXPECT_NEAR(w[static_cast<size_t>(j)], want, 4e-7 * want + 1e-12) << "k=" << k << " j=" << j;
    }
    moe::detail::softmax_kept_f32(v.data(), v.data(), k);  // in place
    EXPECT_EQ(v, w);
  }
}

}  // namespace

namespace {

// n rows of k sorted descending, as the selection leaves them.
std::vector<float> kept_rows(std::mt19937& rng, int64_t n, int64_t k) {
  std::normal_distribution<float> nd;
  std::vector<float> w(static_cast<size_t>(n * k));
  for (auto& x : w) x = nd(rng);
  for (int64_t r = 0; r < n; ++r)
    std::sort(w.begin() + r * k, w.begin() + (r + 1) * k, std::greater<>());
  return w;
}

}  // namespace

// The chunked kept softmax: the formula for every k, and a row's bits do not depend on where
// it sits among the chunk's rows (routing a batch whole or split must agree).
TEST(TopkRows, KeptSoftmaxRowsMatchTheFormulaWhereverTheRowSits) {
  std::mt19937 rng(11);
  for (int64_t k = 1; k <= 70; k = k < 20 ? k + 1 : k + 7) {
    for (int64_t n : {1, 3, 16}) {
      const auto in = kept_rows(rng, n, k);
      auto w = in;
      moe::detail::softmax_kept_rows_f32(w.data(), n, k);
      for (int64_t r = 0; r < n; ++r) {
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += std::exp(double(in[r * k + j]) - in[r * k]);
        for (int64_t j = 0; j < k; ++j) {
          const double want = std::exp(double(in[r * k + j]) - in[r * k]) / sum;
          ASSERT_NEAR(w[r * k + j], want, 1e-6 * want + 1e-12) << "k=" << k << " n=" << n;
        }
        // The same row alone gives the same bits.
        std::vector<float> one(in.begin() + r * k, in.begin() + (r + 1) * k);
        moe::detail::softmax_kept_rows_f32(one.data(), 1, k);
        ASSERT_EQ(0, std::memcmp(one.data(), &w[r * k], static_cast<size_t>(k) * sizeof(float)))
            << "k=" << k << " row " << r << " of " << n;
      }
    }
  }
}
