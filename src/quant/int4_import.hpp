// GPTQ and AWQ int4 checkpoints (4 bits) as their tools publish them, and their repacking into
// libmoe's int4 layout (quant/int4.hpp): pure functions on arrays. Each published layout also
// has a float64 twin written from the format's definition (*_dequant_ref), which the tests hold
// the repacked weights to, bit for bit; tests/python/test_quant_formats.py holds both to an
// independent NumPy reading of the same bytes.
//
// GPTQ (AutoGPTQ / GPTQModel / optimum; torch's nn.Linear weight is (N, K), these are not):
//   qweight int32 (K/8, N)   row k of W at word (k/8, j), bits 4·(k%8)
//   qzeros  int32 (G, N/8)   group g, column j at word (g, j/8), bits 4·(j%8)
//   scales  fp16  (G, N)
//   g_idx   int32 (K)        the group of row k; desc_act ("act-order") checkpoints number the
//                            groups in the order GPTQ visited the rows, so a group's rows are
//                            scattered along K
//   W[k][j] = (q[k][j] − z[g][j]) · scales[g][j],  g = g_idx[k]
//   z: the "v1" convention (AutoGPTQ's format, most published checkpoints) stores z − 1 and
//   reads z = (stored + 1) & 15; "v2" (GPTQModel's internal one) stores z itself.
// AWQ (AutoAWQ "gemm" version):
//   qweight int32 (K, N/8)   column j of row k at word (k, j/8), nibble position p with
//                            order[p] = j % 8, order = {0, 2, 4, 6, 1, 3, 5, 7}, bits 4·p
//   qzeros  int32 (G, N/8)   the same nibble order
//   scales  fp16  (G, N)
//   W[k][j] = (q[k][j] − z[k/group][j]) · scales[k/group][j]   (z stored as is)
#pragma once
#include <cstdint>

#include "quant/int4.hpp"

namespace moe::detail {

struct GptqInt4 {
  int64_t K = 0, N = 0;
  int64_t group = 0;  // group_size; -1: one group over all of K
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const uint16_t* scales = nullptr;
  const int32_t* g_idx = nullptr;  // optional (nullptr: row k in group k / group)
  bool zeros_minus_one = true;     // the v1 convention
  int64_t groups() const;          // G
};

struct AwqInt4 {
  int64_t K = 0, N = 0;
  int64_t group = 0;  // q_group_size
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const uint16_t* scales = nullptr;
  int64_t groups() const;
};

// AWQ's nibble position of column j % 8.
constexpr int kAwqNibbleOf[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// Repacked into the kernel layout: rows sorted by group when g_idx scatters them (perm set),
// zero points dropped when every one is 8 (a symmetric checkpoint). moe::Error names the
// tensor and the rule for a shape, group size or g_idx the layout cannot hold (group not a
// multiple of 32, a group with more rows than group_size, ...).
Int4Kernel::Weights int4_from_gptq(const GptqInt4& t);
Int4Kernel::Weights int4_from_awq(const AwqInt4& t);

// dst (K, N) = the published definition, from the published arrays (obvious loops).
void gptq_dequant_ref(const GptqInt4& t, double* dst);
void awq_dequant_ref(const AwqInt4& t, double* dst);

}  // namespace moe::detail
