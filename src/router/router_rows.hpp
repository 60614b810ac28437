// The fast router's per-token part (everything after the GEMM) and its selection kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/row_math.hpp"
#include "moe/router.hpp"
#include "router/router_ref.hpp"

namespace moe::detail {

// H = h + scale·ε for one row. pre is x·W_noise (learned) or null.
template <typename S>
inline void noisy_row(S* H, const S* h, const S* eps, const S* pre, int64_t E,
                      const RouterConfig& cfg) {
  for (int64_t e = 0; e < E; ++e) {
    S scale;
    if (cfg.noise == Noise::fixed)
      scale = static_cast<S>(cfg.noise_stddev);
    else
      scale = cfg.noise_scale == NoiseScale::softplus ? softplus(pre[e]) : pre[e];
    H[e] = h[e] + scale * eps[e];
  }
}

// Partial selection, O(E·k), for small k: a sorted list of the k best so far; a candidate
// that beats the current k-th is inserted in place. After the first k, most candidates cost
// one compare against the k-th value, held in a register.
template <typename S>
inline void select_topk_insert(int32_t* idx, S* val, const S* row, int64_t E, int64_t k,
                               bool tie_high) {
  auto insert = [&](int64_t pos, S v, int32_t ie) {
    while (pos > 0 && outranks(v, ie, val[pos - 1], idx[pos - 1], tie_high)) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = ie;
  };
  for (int64_t e = 0; e < k; ++e) insert(e, row[e], static_cast<int32_t>(e));
  S thr = val[k - 1];
  for (int64_t e = k; e < E; ++e) {
    const S v = row[e];
    if (v < thr) continue;  // equal values go on to the exact rank test (index order)
    const int32_t ie = static_cast<int32_t>(e);
    if (!outranks(v, ie, thr, idx[k - 1], tie_high)) continue;
    insert(k - 1, v, ie);
    thr = val[k - 1];
  }
}

// k = 1: the row max (a vectorisable reduction), then its highest (or lowest) index.
inline void select_top1_f32(int32_t* idx, float* val, const float* row, int64_t E,
                            bool tie_high) {
  float m = row[0];
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < E; ++e) m = row[e] > m ? row[e] : m;
  int64_t best = tie_high ? -1 : E;
  if (tie_high) {
#pragma omp simd reduction(max : best)
    for (int64_t e = 0; e < E; ++e) best = row[e] == m && e > best ? e : best;
  } else {
#pragma omp simd reduction(min : best)
    for (int64_t e = 0; e < E; ++e) best = row[e] == m && e < best ? e : best;
  }
  idx[0] = static_cast<int32_t>(best);
  val[0] = m;
}

template <typename S>
inline void select_topk_partial(int32_t* idx, S* val, const S* row, int64_t E, int64_t k,
                                bool tie_high) {
  select_topk_insert(idx, val, row, E, k, tie_high);
}

// Selection for large k, O(E·log k), in the output itself: a heap of the k best indices with
// the worst on top, then sorted best first. No scratch beyond idx.
template <typename S>
inline void select_topk_heap(int32_t* idx, S* val, const S* row, int64_t E, int64_t k,
                             bool tie_high) {
  auto before = [&](int32_t a, int32_t b) { return outranks(row[a], a, row[b], b, tie_high); };
  for (int64_t e = 0; e < k; ++e) idx[e] = static_cast<int32_t>(e);
  std::make_heap(idx, idx + k, before);  // top: the kept index every other one outranks
  for (int64_t e = k; e < E; ++e) {
    const int32_t ie = static_cast<int32_t>(e);
    if (!before(ie, idx[0])) continue;
    std::pop_heap(idx, idx + k, before);
    idx[k - 1] = ie;
    std::push_heap(idx, idx + k, before);
  }
  std::sort_heap(idx, idx + k, before);
  for (int64_t j = 0; j < k; ++j) val[j] = row[idx[j]];
}

// Above this k the heap beats insertion.
constexpr int64_t kInsertMaxK = 16;

// What router_rows_f32 reads: the GEMM's raw products with their row strides.
struct RouterRowsInput {
  const float* h = nullptr;    // x·W_g (T, ldh), before the bias; may alias state.logits
  int64_t ldh = 0;
  const float* pre = nullptr;  // x·W_noise (T, ldpre), learned noise in training, else null
  int64_t ldpre = 0;
  const float* b_g = nullptr;  // (E) or null
  const float* sel_bias = nullptr;  // (E) or null: selection-only bias (scores.hpp)
  const float* x = nullptr;    // (T, d) or null: tells a bad x from a bad W_g in errors
  int64_t d = 0;
  const char* h_name = "router logits h";  // how errors call h
  bool probs = true;  // false: skip probs (left unset), only for benchmarking the kept part
};

// C (T, ldc) = x (T, d) · B (d, N), B row-major: every element one fp32 fma chain over
// i = 0 .. d − 1 in order, from 0 (router_gemm.cpp). A row's bits depend on that row alone —
// not on T, the thread count, the tiling or where the row sits in the batch — so routing a
// batch whole or in parts with token offsets gives the same bits, and one token (a decode
// step) reads B once: no padding to a block of rows, as a library GEMM that picks its kernel
// by shape would need. The same bits on the AVX2 and AVX-512 paths (an fma is exact).
void gemm_f32_rows(float* C, int64_t ldc, const float* x, const float* B, int64_t T, int64_t d,
                   int64_t N);

// e^{H - max} into ex (E) and its sum, in a fixed lane order (bits independent of where the
// row sits in memory).
float exp_row_f32(float* ex, const float* H, float mx, int64_t E);

// Sizes s for T tokens under cfg (no allocation when T, E, k and the noise mode repeat).
void router_state_resize(RouterState& s, const RouterConfig& cfg, int64_t T, bool noisy);

// Everything per token after the GEMM: bias, ε, H, finiteness, KeepTopK, the kept softmax
// and probs. OpenMP over blocks of tokens; each token's result depends on nothing but its own
// inputs and global index, so it is the same for any thread count or batch split. Throws
// moe::Error naming the first bad token.
void router_rows_f32(RouterState& s, const RouterRowsInput& in, const RouterConfig& cfg,
                     bool noisy, const NoiseSource& noise);

}  // namespace moe::detail
