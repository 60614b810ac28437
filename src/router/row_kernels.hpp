// KeepTopK over rows of logits, the router's per-token hot loop (SPEC §1: value descending;
// equal values in index order, lowest first or, with tie_high, highest first).
//
// With AVX-512 a row is read in blocks of 16 lanes (the tail padded with -inf): one pass
// keeps each block's maximum, then each of the k picks takes the largest block maximum, the
// first (last) lane holding it in that block, and refreshes that block's maximum without the
// lanes already taken. A pick costs O(E/256 + 1) vector operations instead of a scan of the
// row, so k = 8 of 256 reads the row once. A pick is a chain of dependent shuffles, so four
// rows are picked in lockstep (independent chains the core overlaps). Without AVX-512 the
// portable kernels of router_rows.hpp run. Both give the same indices and values: selection
// only compares, so a row's result never depends on its neighbours or on the path taken.
#pragma once
#include <cstdint>

namespace moe::detail {

// For each of n rows r: idx[r·k + j], val[r·k + j] (j < k) = the k best of
// rows[r·ld .. r·ld + E), best first. A row may hold -inf (masked experts) as long as k of
// its values are finite; no NaN.
void topk_rows_f32(int32_t* idx, float* val, const float* rows, int64_t ld, int64_t n,
                   int64_t E, int64_t k, bool tie_high);

// The same selection while checking that every value is finite (logits: -inf is refused).
// Returns the first row holding a non-finite value, or -1; that row's idx and val are
// unset, and rows after it may be too.
int64_t check_topk_rows_f32(int32_t* idx, float* val, const float* rows, int64_t ld, int64_t n,
                            int64_t E, int64_t k, bool tie_high);

// H = h + scale·ε over one row of E; scale is σ (kMode 0), softplus(pre) (1) or pre (2).
// In blocks of 16 lanes (the tail padded), so every element goes through the same vector code
// whatever its position in the row. Returns false when an element of H is not finite.
template <int kMode>
bool noisy_row_f32(float* H, const float* h, const float* eps, const float* pre, float sigma,
                   int64_t E);

// w[0..k) = softmax of val[0..k) where val[0] is the largest: e^{val - val[0]} / Σ, the sum
// in a fixed lane order. w may alias val.
void softmax_kept_f32(float* w, const float* val, int64_t k);

// The same in place on n rows of k (w[r·k] the largest of row r): the exponentials of all
// rows in shared 16-lane blocks (each value through the same vector code wherever it sits),
// each row's sum in a fixed order that does not depend on the row's position.
void softmax_kept_rows_f32(float* w, int64_t n, int64_t k);

}  // namespace moe::detail
