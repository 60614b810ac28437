#include "router/row_kernels.hpp"

#include <algorithm>
#include <cmath>

#include "common/vec_math.hpp"
#include "router/router_rows.hpp"

#include <immintrin.h>

#include "common/cpu.hpp"
// GCC 12 warns inside its own AVX-512 headers: the shuffle and reduce intrinsics pass
// _mm512_undefined_ps() as the unused merge source, which -Wmaybe-uninitialized reports.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The `omp simd` loops below run over alignas(64) local buffers and carry no aligned() clause:
// clang 14 with -fsanitize=undefined (the fuzz build) crashes generating the alignment check
// for it, and the compilers know a local array's alignment without it.

namespace moe::detail {

namespace {

// The portable selection: one compare per value against the k-th best for small k, a heap
// of the k best above.
void topk_portable(int32_t* idx, float* val, const float* row, int64_t E, int64_t k,
                   bool tie_high) {
  if (k == 1)
    select_top1_f32(idx, val, row, E, tie_high);
  else if (k <= kInsertMaxK)
    select_topk_insert(idx, val, row, E, k, tie_high);
  else
    select_topk_heap(idx, val, row, E, k, tie_high);
}

bool row_finite(const float* row, int64_t E) {
  return std::all_of(row, row + E, [](float v) { return std::isfinite(v); });
}

// The AVX-512 kernels: compiled for AVX-512 whatever the build's baseline (no -march=native)
// and called only where cpu() allows it (common/cpu.hpp). Each computes the same values as
// its portable twin, in the same order, so the level never changes a result.
// AVX-512 code from here to the pop below (GCC's target pragma; clang's attribute pragma
// does the same, as clang ignores GCC's).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#endif

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxBlocks = 256;  // rows of up to 4096 experts take the vector path
constexpr int kGroup = 4;            // rows picked in lockstep

// The lanes of block b that hold row values.
inline __mmask16 valid_lanes(int64_t E, int64_t b) {
  const int64_t n = E - b * kLanes;
  return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// The maximum of v in every lane (a butterfly: no scalar round trip before the compare).
inline __m512 broadcast_max(__m512 v) {
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
}

// The maximum of lanes 0..3 in lanes 0..3 (when the others hold -inf; their own lanes then
// hold -inf too, so compares must be masked to the lanes in use).
inline __m512 broadcast_max4(__m512 v) {
  v = _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
}

// The rank order's first lane of a non-empty lane mask: lowest index first, or highest.
inline int first_lane(uint32_t m, bool tie_high) {
  return tie_high ? 31 - __builtin_clz(m) : __builtin_ctz(m);
}

// Lanes of v that are finite (v - v is 0 exactly there; NaN for ±inf and NaN).
inline __mmask16 finite_lanes(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

// Reads block b of a row (-inf past E) and, with kCheck, notes its non-finite lanes.
template <bool kCheck>
inline __m512 read_block(__mmask16& bad, const float* row, int64_t E, int64_t b) {
  const __mmask16 valid = valid_lanes(E, b);
  const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, row + b * kLanes);
  if (kCheck) bad = static_cast<__mmask16>(bad | (valid & ~finite_lanes(v)));
  return v;
}

// k = 1, any E: the row's maximum, then the first (last) block and lane holding it.
template <bool kCheck>
bool top1_row(int32_t* idx, float* val, const float* row, int64_t E, bool tie_high) {
  const int64_t nb = (E + kLanes - 1) / kLanes;
  if (nb <= 4) {
    // Up to 64 experts: the blocks stay in registers and their hit masks form one 64-bit
    // mask, so the winner is one bit scan with no data-dependent branch.
    __mmask16 bad = 0;
    __m512 v[4];
    for (int64_t b = 0; b < 4; ++b)
      v[b] = b < nb ? read_block<kCheck>(bad, row, E, b) : _mm512_set1_ps(-INFINITY);
    if (bad) return false;
    const __m512 m =
        broadcast_max(_mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3])));
    uint64_t hit = 0;
    for (int64_t b = 0; b < nb; ++b)
      hit |= uint64_t{_mm512_mask_cmp_ps_mask(valid_lanes(E, b), v[b], m, _CMP_EQ_OQ)}
             << (b * kLanes);
    idx[0] = static_cast<int32_t>(tie_high ? 63 - __builtin_clzll(hit) : __builtin_ctzll(hit));
    val[0] = _mm512_cvtss_f32(m);
    return true;
  }
  __mmask16 bad = 0;
  __m512 acc = read_block<kCheck>(bad, row, E, 0);
  for (int64_t b = 1; b < nb; ++b) acc = _mm512_max_ps(acc, read_block<kCheck>(bad, row, E, b));
  if (bad) return false;
  const __m512 m = broadcast_max(acc);
  for (int64_t i = 0;; ++i) {
    const int64_t b = tie_high ? nb - 1 - i : i;
    const __mmask16 valid = valid_lanes(E, b);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, row + b * kLanes);
    const uint32_t hit = _mm512_mask_cmp_ps_mask(valid, v, m, _CMP_EQ_OQ);
    if (hit != 0) {
      idx[0] = static_cast<int32_t>(b * kLanes + first_lane(hit, tie_high));
      val[0] = _mm512_cvtss_f32(m);
      return true;
    }
  }
}

// E ≤ 16: G whole rows in G registers; each pick takes the best lane and clears it.
template <int G, bool kCheck>
uint32_t topk_one_block(int32_t* idx, float* val, const float* rows, int64_t ld,
                        int64_t E, int64_t k, bool tie_high) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __mmask16 valid = valid_lanes(E, 0);
  __m512 v[G];
  uint32_t bad_rows = 0;
  for (int g = 0; g < G; ++g) {
    __mmask16 bad = 0;
    v[g] = read_block<kCheck>(bad, rows + g * ld, E, 0);
    if (bad) bad_rows |= 1u << g;
  }
  if (bad_rows) return bad_rows;
  if (k > 2) {
    // Many picks: rank every lane at once instead. Lane i's rank counts the lanes j that
    // outrank it (larger, or equal and earlier in tie order); lane i then goes to slot rank.
    for (int g = 0; g < G; ++g) {
      const float* row = rows + g * ld;
      __m512i rank = _mm512_setzero_si512();
      for (int64_t j = 0; j < E; ++j) {
        const __m512 vj = _mm512_set1_ps(row[j]);
        // Lanes that j precedes on a tie: those after it (low) or before it (high).
        const __mmask16 after = static_cast<__mmask16>(tie_high ? (1u << j) - 1u : ~((2u << j) - 1u));
        const __mmask16 beaten = static_cast<__mmask16>(
            _mm512_cmp_ps_mask(vj, v[g], _CMP_GT_OQ) |
            _mm512_mask_cmp_ps_mask(after, vj, v[g], _CMP_EQ_OQ));
        rank = _mm512_mask_add_epi32(rank, beaten, rank, _mm512_set1_epi32(1));
      }
      // Slot r's lane: the one lane of rank r (independent compares, no chain between slots).
      for (int64_t r = 0; r < k; ++r) {
        const int lane = __builtin_ctz(
            _mm512_mask_cmpeq_epi32_mask(valid, rank, _mm512_set1_epi32(static_cast<int>(r))));
        idx[g * k + r] = lane;
        val[g * k + r] = row[lane];
      }
    }
    return 0;
  }
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512 m = E <= 4 ? broadcast_max4(v[g]) : broadcast_max(v[g]);
      const int lane = first_lane(_mm512_mask_cmp_ps_mask(valid, v[g], m, _CMP_EQ_OQ), tie_high);
      idx[g * k + j] = lane;
      val[g * k + j] = _mm512_cvtss_f32(m);
      v[g] = _mm512_mask_mov_ps(v[g], __mmask16(1u << lane), ninf);
    }
  }
  return 0;
}

// 16 < E ≤ 256: the block maxima of each of G rows in one register.
template <int G, bool kCheck>
uint32_t topk_one_vector(int32_t* idx, float* val, const float* rows, int64_t ld,
                         int64_t E, int64_t k, bool tie_high) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const int64_t nb = (E + kLanes - 1) / kLanes;
  const __mmask16 blocks = valid_lanes(nb, 0);  // the lanes of bm that are blocks
  __m512 bm[G];
  uint16_t taken[G][kLanes];
  uint32_t bad_rows = 0;
  for (int g = 0; g < G; ++g) {
    __mmask16 bad = 0;
    bm[g] = ninf;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 v = read_block<kCheck>(bad, rows + g * ld, E, b);
      bm[g] = _mm512_mask_mov_ps(bm[g], __mmask16(1u << b), broadcast_max(v));
      taken[g][b] = 0;
    }
    if (bad) bad_rows |= 1u << g;
  }
  if (bad_rows) return bad_rows;
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512 m = nb <= 4 ? _mm512_broadcastss_ps(_mm512_castps512_ps128(broadcast_max4(bm[g])))
                               : broadcast_max(bm[g]);
      const int b = first_lane(_mm512_mask_cmp_ps_mask(blocks, bm[g], m, _CMP_EQ_OQ), tie_high);
      const __mmask16 valid = valid_lanes(E, b);
      const __m512 v = _mm512_mask_loadu_ps(ninf, valid, rows + g * ld + b * kLanes);
      const uint32_t hit = _mm512_cmp_ps_mask(v, m, _CMP_EQ_OQ) & ~uint32_t(taken[g][b]);
      const int lane = first_lane(hit, tie_high);
      taken[g][b] = static_cast<uint16_t>(taken[g][b] | (1u << lane));
      idx[g * k + j] = static_cast<int32_t>(b * kLanes + lane);
      val[g * k + j] = _mm512_cvtss_f32(m);
      if (j + 1 == k) continue;  // the last pick needs no new block maximum
      const __m512 rest = _mm512_mask_mov_ps(ninf, __mmask16(valid & ~taken[g][b]), v);
      bm[g] = _mm512_mask_mov_ps(bm[g], __mmask16(1u << b), broadcast_max(rest));
    }
  }
  return 0;
}

// 256 < E ≤ 4096, one row: the block maxima in memory, 16 to a vector.
template <bool kCheck>
bool topk_many_vectors(int32_t* idx, float* val, const float* row, int64_t E,
                       int64_t k, bool tie_high) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const int64_t nb = (E + kLanes - 1) / kLanes, nq = (nb + kLanes - 1) / kLanes;
  alignas(64) float bm[kMaxBlocks];
  uint16_t taken[kMaxBlocks];
  __mmask16 bad = 0;
  for (int64_t q = 0; q < nq; ++q) {
    __m512 acc = ninf;
    for (int64_t l = 0; l < kLanes && q * kLanes + l < nb; ++l) {
      const __m512 v = read_block<kCheck>(bad, row, E, q * kLanes + l);
      acc = _mm512_mask_mov_ps(acc, __mmask16(1u << l), broadcast_max(v));
      taken[q * kLanes + l] = 0;
    }
    _mm512_store_ps(bm + q * kLanes, acc);
  }
  if (bad) return false;
  for (int64_t j = 0; j < k; ++j) {
    __m512 acc = _mm512_load_ps(bm);
    for (int64_t q = 1; q < nq; ++q) acc = _mm512_max_ps(acc, _mm512_load_ps(bm + q * kLanes));
    const __m512 m = broadcast_max(acc);
    int64_t b = -1;  // the block holding the best value first in rank order
    for (int64_t i = 0; b < 0; ++i) {
      const int64_t q = tie_high ? nq - 1 - i : i;
      const uint32_t hit = _mm512_cmp_ps_mask(_mm512_load_ps(bm + q * kLanes), m, _CMP_EQ_OQ);
      if (hit != 0) b = q * kLanes + first_lane(hit, tie_high);
    }
    const __mmask16 valid = valid_lanes(E, b);
    const __m512 v = _mm512_mask_loadu_ps(ninf, valid, row + b * kLanes);
    const uint32_t hit = _mm512_cmp_ps_mask(v, m, _CMP_EQ_OQ) & ~uint32_t(taken[b]);
    const int lane = first_lane(hit, tie_high);
    taken[b] = static_cast<uint16_t>(taken[b] | (1u << lane));
    idx[j] = static_cast<int32_t>(b * kLanes + lane);
    val[j] = _mm512_cvtss_f32(m);
    // The block's new maximum, written back as a whole vector (the next pick's vector load
    // then forwards from this store instead of stalling on a scalar one).
    const __m512 rest = _mm512_mask_mov_ps(ninf, __mmask16(valid & ~taken[b]), v);
    float* chunk = bm + b / kLanes * kLanes;
    _mm512_store_ps(chunk, _mm512_mask_mov_ps(_mm512_load_ps(chunk),
                                              __mmask16(1u << (b % kLanes)), broadcast_max(rest)));
  }
  return true;
}

// n rows, G at a time while they last; returns the first bad row or -1.
template <bool kCheck>
int64_t topk_rows_avx512(int32_t* idx, float* val, const float* rows, int64_t ld,
                         int64_t n, int64_t E, int64_t k, bool tie_high) {
  auto first_bad = [](uint32_t bad_rows, int64_t r) {
    return bad_rows ? r + __builtin_ctz(bad_rows) : int64_t{-1};
  };
  int64_t r = 0;
  if (k == 1) {
    for (; r < n; ++r)
      if (!top1_row<kCheck>(idx + r, val + r, rows + r * ld, E, tie_high)) return r;
    return -1;
  }
  for (; E <= kLanes * kLanes && r + kGroup <= n; r += kGroup) {
    const uint32_t bad =
        E <= kLanes ? topk_one_block<kGroup, kCheck>(idx + r * k, val + r * k, rows + r * ld, ld,
                                                     E, k, tie_high)
                    : topk_one_vector<kGroup, kCheck>(idx + r * k, val + r * k, rows + r * ld, ld,
                                                      E, k, tie_high);
    if (bad) return first_bad(bad, r);
  }
  for (; r < n; ++r) {
    bool ok;
    if (E <= kLanes)
      ok = topk_one_block<1, kCheck>(idx + r * k, val + r * k, rows + r * ld, ld, E, k,
                                     tie_high) == 0;
    else if (E <= kLanes * kLanes)
      ok = topk_one_vector<1, kCheck>(idx + r * k, val + r * k, rows + r * ld, ld, E, k,
                                      tie_high) == 0;
    else
      ok = topk_many_vectors<kCheck>(idx + r * k, val + r * k, rows + r * ld, E, k, tie_high);
    if (!ok) return r;
  }
  return -1;
}

template <int kMode>
bool noisy_row_avx512(float* H, const float* h, const float* eps, const float* pre, float sigma,
                      int64_t E) {
  constexpr int kBlock = 16;
  alignas(64) float pb[kBlock];
  __mmask16 bad = 0;
  for (int64_t e0 = 0; e0 < E; e0 += kBlock) {
    const __mmask16 valid = valid_lanes(E - e0, 0);
    const __m512 hb = _mm512_maskz_loadu_ps(valid, h + e0);
    const __m512 eb = _mm512_maskz_loadu_ps(valid, eps + e0);
    __m512 scale = _mm512_set1_ps(sigma);
    if (kMode != 0) {
      _mm512_store_ps(pb, _mm512_maskz_loadu_ps(valid, pre + e0));
      if (kMode == 1) {
#pragma omp simd
        for (int l = 0; l < kBlock; ++l) pb[l] = softplus_f32(pb[l]);
      }
      scale = _mm512_load_ps(pb);
    }
    const __m512 o = _mm512_add_ps(hb, _mm512_mul_ps(scale, eb));
    bad = static_cast<__mmask16>(bad | (valid & ~finite_lanes(o)));
    _mm512_mask_storeu_ps(H + e0, valid, o);
  }
  return bad == 0;
}

// k of 2, 4, 8 or 16: whole rows per vector.
void softmax_kept_rows_avx512(float* w, int64_t n, int64_t k) {
  // Whole rows per vector: each lane subtracts its row's first value, and a butterfly
  // within each group of k lanes gives every lane of a row the same sum (x + y = y + x).
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row_first = _mm512_andnot_si512(_mm512_set1_epi32(static_cast<int>(k - 1)), lane);
  const int64_t m = n * k;
  alignas(64) float b[kLanes];
  for (int64_t i = 0; i < m; i += kLanes) {
    const __mmask16 valid = valid_lanes(m - i, 0);
    const __m512 v = _mm512_maskz_loadu_ps(valid, w + i);
    _mm512_store_ps(b, _mm512_sub_ps(v, _mm512_permutexvar_ps(row_first, v)));
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) b[l] = exp_f32(b[l]);
    const __m512 e = _mm512_load_ps(b);
    __m512 sum = e;
    for (int sh = 1; sh < k; sh <<= 1)
      sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(sh)), sum));
    _mm512_mask_storeu_ps(w + i, valid, _mm512_div_ps(e, sum));
  }
}

// exp_row_f32's lanes: their sums into b (16).
void exp_row_avx512(float* ex, float* b, const float* H, float mx, int64_t E) {
  constexpr int kBlock = 16;
  const __m512 ninf = _mm512_set1_ps(-INFINITY), vmx = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e0 = 0; e0 < E; e0 += kBlock) {
    const __mmask16 valid = valid_lanes(E - e0, 0);  // e^-inf = 0 past the row
    _mm512_store_ps(b, _mm512_sub_ps(_mm512_mask_loadu_ps(ninf, valid, H + e0), vmx));
#pragma omp simd
    for (int l = 0; l < kBlock; ++l) b[l] = exp_f32(b[l]);
    const __m512 e = _mm512_load_ps(b);
    acc = _mm512_add_ps(acc, e);
    _mm512_mask_storeu_ps(ex + e0, valid, e);
  }
  _mm512_store_ps(b, acc);
}

// k ≤ 16: one vector; the sum in a fixed butterfly order.
void softmax_kept_avx512(float* w, const float* val, int64_t k) {
  const __mmask16 valid = valid_lanes(k, 0);
  alignas(64) float b[kLanes];
  _mm512_store_ps(b, _mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, val),
                                   _mm512_set1_ps(val[0])));
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) b[l] = exp_f32(b[l]);
  const __m512 e = _mm512_load_ps(b);
  __m512 sum = _mm512_add_ps(e, _mm512_shuffle_f32x4(e, e, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
  sum = _mm512_add_ps(sum, _mm512_permute_ps(sum, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm512_add_ps(sum, _mm512_permute_ps(sum, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm512_mask_storeu_ps(w, valid, _mm512_div_ps(e, sum));
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool wide() { return isa_at_least(Isa::avx512); }

}  // namespace

void topk_rows_f32(int32_t* idx, float* val, const float* rows, int64_t ld, int64_t n,
                   int64_t E, int64_t k, bool tie_high) {
  if (wide() && E <= kMaxBlocks * kLanes) {
    topk_rows_avx512<false>(idx, val, rows, ld, n, E, k, tie_high);
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    topk_portable(idx + r * k, val + r * k, rows + r * ld, E, k, tie_high);
}

int64_t check_topk_rows_f32(int32_t* idx, float* val, const float* rows, int64_t ld, int64_t n,
                            int64_t E, int64_t k, bool tie_high) {
  if (wide() && E <= kMaxBlocks * kLanes)
    return topk_rows_avx512<true>(idx, val, rows, ld, n, E, k, tie_high);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = rows + r * ld;
    if (!row_finite(row, E)) return r;
    topk_portable(idx + r * k, val + r * k, row, E, k, tie_high);
  }
  return -1;
}

template <int kMode>
bool noisy_row_f32(float* H, const float* h, const float* eps, const float* pre, float sigma,
                   int64_t E) {
  if (wide()) return noisy_row_avx512<kMode>(H, h, eps, pre, sigma, E);
  constexpr int kBlock = 16;
  alignas(64) float pb[kBlock], out[kBlock];
  bool ok = true;
  for (int64_t e0 = 0; e0 < E; e0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, E - e0));
    alignas(64) float hb[kBlock] = {}, eb[kBlock] = {};
    std::fill(pb, pb + kBlock, 0.0f);
    std::copy(h + e0, h + e0 + n, hb);
    std::copy(eps + e0, eps + e0 + n, eb);
    if (kMode != 0) std::copy(pre + e0, pre + e0 + n, pb);
#pragma omp simd
    for (int l = 0; l < kBlock; ++l) {
      const float scale = kMode == 0 ? sigma : kMode == 1 ? softplus_f32(pb[l]) : pb[l];
      out[l] = hb[l] + scale * eb[l];
    }
    ok &= row_finite(out, n);
    std::copy(out, out + n, H + e0);
  }
  return ok;
}
template bool noisy_row_f32<0>(float*, const float*, const float*, const float*, float, int64_t);
template bool noisy_row_f32<1>(float*, const float*, const float*, const float*, float, int64_t);
template bool noisy_row_f32<2>(float*, const float*, const float*, const float*, float, int64_t);

void softmax_kept_rows_f32(float* w, int64_t n, int64_t k) {
  constexpr int64_t kBuf = 256;
  if (k == 1) {
    std::fill(w, w + n, 1.0f);  // e^0 / e^0, exactly
    return;
  }
  if (wide() && (k == 2 || k == 4 || k == 8 || k == 16)) return softmax_kept_rows_avx512(w, n, k);
  if (k > kBuf / 4) {
    for (int64_t r = 0; r < n; ++r) softmax_kept_f32(w + r * k, w + r * k, k);
    return;
  }
  const int64_t rows_per = kBuf / k;
  alignas(64) float x[kBuf];
  for (int64_t r0 = 0; r0 < n; r0 += rows_per) {
    const int64_t nr = std::min(rows_per, n - r0), m = nr * k;
    float* wr = w + r0 * k;
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t j = 0; j < k; ++j) x[r * k + j] = wr[r * k + j] - wr[r * k];
    const int64_t padded = (m + 15) / 16 * 16;
    std::fill(x + m, x + padded, 0.0f);
    for (int64_t b = 0; b < padded; b += 16) {
      float* xb = x + b;
#pragma omp simd
      for (int l = 0; l < 16; ++l) xb[l] = exp_f32(xb[l]);
    }
    for (int64_t r = 0; r < nr; ++r) {
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) sum += x[r * k + j];
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < k; ++j) wr[r * k + j] = x[r * k + j] * inv;
    }
  }
}

// e^{H - max} into ex (E) and its sum, in blocks of 16 lanes; lane l sums the elements
// e ≡ l (mod 16) and the lanes are added in a fixed order, so the sum never depends on
// where the row sits in memory.
float exp_row_f32(float* ex, const float* H, float mx, int64_t E) {
  constexpr int kBlock = 16;
  alignas(64) float b[kBlock];
  if (wide()) {
    exp_row_avx512(ex, b, H, mx, E);
  } else {
    alignas(64) float acc[kBlock] = {};
    for (int64_t e0 = 0; e0 < E; e0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, E - e0));
      for (int l = 0; l < kBlock; ++l) b[l] = l < n ? H[e0 + l] - mx : -INFINITY;
#pragma omp simd
      for (int l = 0; l < kBlock; ++l) {
        b[l] = exp_f32(b[l]);
        acc[l] += b[l];
      }
      for (int l = 0; l < n; ++l) ex[e0 + l] = b[l];
    }
    std::copy(acc, acc + kBlock, b);
  }
  for (int w = kBlock / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) b[l] += b[l + w];
  return b[0];
}

void softmax_kept_f32(float* w, const float* val, int64_t k) {
  if (k == 1) {  // e^0 / e^0, exactly
    w[0] = 1.0f;
    return;
  }
  if (wide() && k <= kLanes) return softmax_kept_avx512(w, val, k);
  const float sum = exp_row_f32(w, val, val[0], k);
  for (int64_t j = 0; j < k; ++j) w[j] /= sum;
}

}  // namespace moe::detail
