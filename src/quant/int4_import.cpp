#include "quant/int4_import.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/check.hpp"

namespace moe::detail {

namespace {

int nibble(int32_t word, int pos) { return static_cast<int>((static_cast<uint32_t>(word) >> (4 * pos)) & 15u); }

int64_t gptq_group(const GptqInt4& t) { return t.group == -1 ? t.K : t.group; }

void check_gptq(const GptqInt4& t) {
  MOE_REQUIRE(t.K > 0 && t.N > 0 && t.K % 8 == 0 && t.N % 8 == 0,
              "GPTQ int4: in_features (", t.K, ") and out_features (", t.N,
              ") must be positive multiples of 8 (qweight packs 8 rows a word, qzeros 8 columns)");
  MOE_REQUIRE(t.group == -1 || t.group > 0, "GPTQ int4: group_size must be positive or -1, got ",
              t.group);
  MOE_REQUIRE(t.qweight && t.qzeros && t.scales, "GPTQ int4: qweight, qzeros and scales are required");
  const int64_t g = gptq_group(t);
  MOE_REQUIRE(t.group == -1 || g == 32 || g == 64 || g % 128 == 0, "GPTQ int4: group_size ",
              t.group, " is not 32, 64 or a multiple of 128, which the int4 kernel layout needs");
}

void check_awq(const AwqInt4& t) {
  MOE_REQUIRE(t.K > 0 && t.N > 0 && t.N % 8 == 0, "AWQ int4: in_features (", t.K,
              ") must be positive and out_features (", t.N, ") a positive multiple of 8");
  MOE_REQUIRE(t.group == 32 || t.group == 64 || (t.group > 0 && t.group % 128 == 0),
              "AWQ int4: q_group_size ", t.group,
              " is not 32, 64 or a multiple of 128, which the int4 kernel layout needs");
  MOE_REQUIRE(t.qweight && t.qzeros && t.scales, "AWQ int4: qweight, qzeros and scales are required");
}

int gptq_zero(const GptqInt4& t, int64_t g, int64_t j) {
  const int z = nibble(t.qzeros[g * (t.N / 8) + j / 8], static_cast<int>(j % 8));
  return t.zeros_minus_one ? (z + 1) & 15 : z;
}
int gptq_code(const GptqInt4& t, int64_t k, int64_t j) {
  return nibble(t.qweight[(k / 8) * t.N + j], static_cast<int>(k % 8));
}
int awq_nibble(const int32_t* words, int64_t row, int64_t N, int64_t j) {
  return nibble(words[row * (N / 8) + j / 8], kAwqNibbleOf[j % 8]);
}

// Zero points all 8 (a symmetric checkpoint): the layout without them reads the same values.
void drop_zeros_if_symmetric(Int4Kernel::Weights& w) {
  if (std::all_of(w.zeros.begin(), w.zeros.end(), [](uint8_t z) { return z == 8; })) {
    w.zero_points = false;
    w.zeros.clear();
  }
}

}  // namespace

int64_t GptqInt4::groups() const {
  const int64_t g = group == -1 ? K : group;
  return g > 0 ? (K + g - 1) / g : 0;
}
int64_t AwqInt4::groups() const { return group > 0 ? (K + group - 1) / group : 0; }

Int4Kernel::Weights int4_from_gptq(const GptqInt4& t) {
  check_gptq(t);
  const int64_t K = t.K, N = t.N, G = t.groups(), g = gptq_group(t);
  // The kernel's group: GPTQ's, or all of K rounded up to a chunk (group_size -1).
  const int64_t kg = t.group == -1 ? (K + 127) / 128 * 128 : g;
  // Kernel order: rows sorted by group, stably; each group must then be the rows
  // [gi·group, (gi+1)·group) of that order.
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  if (t.g_idx) {
    for (int64_t k = 0; k < K; ++k)
      MOE_REQUIRE(t.g_idx[k] >= 0 && t.g_idx[k] < G, "GPTQ int4: g_idx[", k, "] = ", t.g_idx[k],
                  " is outside the ", G, " groups of scales");
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return t.g_idx[a] < t.g_idx[b]; });
    for (int64_t r = 0; r < K; ++r)
      MOE_REQUIRE(t.g_idx[order[r]] == r / g, "GPTQ int4: g_idx puts ",
                  std::count(t.g_idx, t.g_idx + K, t.g_idx[order[r]]), " rows in group ",
                  t.g_idx[order[r]], "; each group must hold group_size = ", g,
                  " rows (the last one the rest)");
  }
  const bool permuted = !std::is_sorted(order.begin(), order.end());
  Int4Kernel::Weights w;
  w.resize(K, N, kg, true);
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t gi = 0; gi < G; ++gi) {
      w.scales[static_cast<size_t>(j * G + gi)] = t.scales[gi * N + j];
      w.zeros[static_cast<size_t>(j * G + gi)] = static_cast<uint8_t>(gptq_zero(t, gi, j));
    }
    for (int64_t r = 0; r < K; ++r) w.set_code(r, j, static_cast<uint8_t>(gptq_code(t, order[r], j)));
    for (int64_t r = K; r < w.padded_k(); ++r) w.set_code(r, j, w.zeros[static_cast<size_t>(j * G + r / kg)]);
  }
  if (permuted) w.perm = std::move(order);
  drop_zeros_if_symmetric(w);
  return w;
}

Int4Kernel::Weights int4_from_awq(const AwqInt4& t) {
  check_awq(t);
  const int64_t K = t.K, N = t.N, G = t.groups();
  Int4Kernel::Weights w;
  w.resize(K, N, t.group, true);
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t gi = 0; gi < G; ++gi) {
      w.scales[static_cast<size_t>(j * G + gi)] = t.scales[gi * N + j];
      w.zeros[static_cast<size_t>(j * G + gi)] = static_cast<uint8_t>(awq_nibble(t.qzeros, gi, N, j));
    }
    for (int64_t k = 0; k < K; ++k) w.set_code(k, j, static_cast<uint8_t>(awq_nibble(t.qweight, k, N, j)));
    for (int64_t r = K; r < w.padded_k(); ++r) w.set_code(r, j, w.zeros[static_cast<size_t>(j * G + r / t.group)]);
  }
  drop_zeros_if_symmetric(w);
  return w;
}

void gptq_dequant_ref(const GptqInt4& t, double* dst) {
  check_gptq(t);
  const int64_t g = gptq_group(t);
  for (int64_t k = 0; k < t.K; ++k) {
    const int64_t gi = t.g_idx ? t.g_idx[k] : k / g;
    for (int64_t j = 0; j < t.N; ++j)
      dst[k * t.N + j] = static_cast<double>(gptq_code(t, k, j) - gptq_zero(t, gi, j)) *
                         static_cast<double>(f16_to_f32(t.scales[gi * t.N + j]));
  }
}

void awq_dequant_ref(const AwqInt4& t, double* dst) {
  check_awq(t);
  for (int64_t k = 0; k < t.K; ++k) {
    const int64_t gi = k / t.group;
    for (int64_t j = 0; j < t.N; ++j)
      dst[k * t.N + j] =
          static_cast<double>(awq_nibble(t.qweight, k, t.N, j) - awq_nibble(t.qzeros, gi, t.N, j)) *
          static_cast<double>(f16_to_f32(t.scales[gi * t.N + j]));
  }
}

}  // namespace moe::detail
