// precision "int8" (SPEC §6, evaluation only): expert weights quantized symmetrically per
// output channel, activations quantized per row when they enter a product (dynamic, per
// token), integer products summed exactly in int32, then scaled back to fp32. Biases,
// activations, gate weighting and combine stay fp32. Why this form and what it measured
// against the alternatives: docs/design.md, "Precision int8".
//
// Quantization (weights and rows alike), for a vector v with a = max |v_i|:
//   scale = a / 127,  q_i = clamp(rint(v_i / scale), -127, 127)  (nearest, ties to even),
// and q = 0 when a = 0. A row holding a NaN gets a NaN scale, so its outputs are NaN as in
// fp32. The float64 twin (experts/int8_ref.hpp) uses the same functions, so both work on the
// same integers and scales.
//
// Products: y_j = sx · sw_j · Σ_i qx_i · qw_ij. The kernel feeds unsigned bytes (qx + 128)
// to AVX512-VNNI's vpdpbusd (u8 × s8 → s32) and subtracts 128 · Σ_i qw_ij per column. The
// sums are exact (|Σ| < 2^31 for widths ≤ 65536, which validate() requires), so every kernel
// gives the same bits, and so does any thread count: AMX's tdpbusd (kernels/amx_gemm.hpp, at
// MOE_AMX_MIN_ROWS rows or more where the level is amx), AVX512-VNNI's vpdpbusd (level avx512
// and up on a CPU with VNNI), and a portable loop (MOE_MAX_ISA=avx2, or no VNNI).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "experts/experts.hpp"

namespace moe::detail {

// The largest width (d_model, d_ff, d_out) whose int32 sums cannot overflow: 255·127·K < 2^31.
constexpr int64_t kInt8MaxWidth = 65536;

// The quantization of one value with a given scale (see above).
inline int8_t quantize_int8(float v, float scale) {
  if (scale == 0.0f) return 0;
  float r = std::nearbyint(v / scale);
  r = r < 127.0f ? r : 127.0f;   // NaN -> 127, as the vector code's min
  r = r > -127.0f ? r : -127.0f;
  return static_cast<int8_t>(r);
}
// The scale of values whose largest magnitude is amax (NaN when a value was NaN).
inline float int8_scale(float amax, bool nan) {
  return nan ? std::nanf("") : amax / 127.0f;
}

// One stacked weight (E, K, N) quantized per expert and output column, packed for the
// kernel: per expert, blocks of 64 columns; in a block, for each group of 4 rows k, the
// 64 columns' 4 bytes side by side (256 bytes), so that one 64-byte load feeds one vpdpbusd,
// 16 groups × 16 columns are an AMX B tile at a stride of 256 bytes, and a block's whole K
// streams from one contiguous run. K is padded to a multiple of 64 (K4 to 16: a whole tile)
// and N to 64 with zeros (scale 0 beyond N).
struct Int8Stack {
  static constexpr int64_t kCols = 64;
  static constexpr int64_t kK4Align = 16;  // K4 is padded to this (one AMX tile of K)
  int64_t E = 0, K = 0, N = 0, K4 = 0, NB = 0;
  std::vector<int8_t> q;        // E · NB · K4 · 256
  std::vector<float> scale;     // (E, NB·64)
  std::vector<int32_t> colsum;  // (E, NB·64): Σ_k q[k][j], for the +128 offset

  void resize(int64_t E_, int64_t K_, int64_t N_);
  // Quantizes expert e from W (K, N) row-major fp32.
  void assign(int64_t e, const float* W);
  const int8_t* block(int64_t e, int64_t nb) const { return q.data() + (e * NB + nb) * K4 * 256; }
  int8_t at(int64_t e, int64_t k, int64_t j) const {  // the quantized W_e[k][j]
    return block(e, j / kCols)[(k / 4) * 256 + (j % kCols) * 4 + k % 4];
  }
  // Bytes held: the int8 values (padding included) and the scales.
  int64_t bytes() const {
    return static_cast<int64_t>(q.size()) +
           static_cast<int64_t>(scale.size() * sizeof(float) + colsum.size() * sizeof(int32_t));
  }
};

// The int8 copies of an expert stack's W1, W2, W3, made from the fp32 masters when stale
// (the owner calls invalidate() whenever the masters may have changed, as for bf16), or,
// in a layer that holds no masters (hold_only), the weights themselves, filled one expert
// matrix at a time by assign().
struct ExpertWeightsInt8 {
  Int8Stack W1, W2, W3;
  bool ready = false;
  bool fixed = false;  // no masters: the stacks are the weights, never made again

  void invalidate() {
    if (!fixed) ready = false;
  }
  // Sizes the stacks for s (no values), e.g. before assign() without masters.
  void shape(const ExpertShape& s);
  // No masters: the stacks sized for s (zero weights until assigned) are the weights.
  void hold_only(const ExpertShape& s) {
    shape(s);
    ready = fixed = true;
  }
  // Makes the copies from the masters unless ready.
  void prepare(const ExpertWeights& w, const ExpertShape& s);
  // Quantizes expert e's matrix "W1", "W2" or "W3" from src (its (K, N) fp32 values), after
  // shape(). Does not change `ready`.
  void assign(const std::string& matrix, int64_t e, const float* src);
  int64_t bytes() const { return W1.bytes() + W2.bytes() + W3.bytes(); }
};

// Rows quantized on entry to a product: (R, K4·4) bytes qx + 128 each, and their scales.
// Grows, never shrinks.
struct ExpertScratchInt8 {
  std::vector<uint8_t> x, hid;
  std::vector<float> x_scale, hid_scale;
};

// Quantizes rows of src (rows, cols), stride lds, to dst (rows, ldd bytes) as qx + 128 (the
// padding up to ldd filled with 128, i.e. zero) and their scales. Parallel when large.
void quantize_rows_u8(uint8_t* dst, int64_t ldd, float* scales, const float* src, int64_t lds,
                      int64_t rows, int64_t cols);

// C rows (M, N) = dequantized (A rows · B_e): A holds M rows of qx + 128 with stride lda
// (bytes, ≥ B.K4·4), a_scale their scales; C has stride ldc. One thread; for tests and the
// forward's tasks.
void gemm_u8s8_expert(float* C, int64_t ldc, const uint8_t* A, int64_t lda, const float* a_scale,
                      int64_t M, const Int8Stack& B, int64_t e);

// The kernel the products run, for reports: "amx_int8 …", "avx512_vnni" or "portable".
const char* int8_kernel_name();

// The int8 forward of experts_forward: acts.out is assigned from xg (R, d); acts.a1 (and
// a3 for swiglu) receive the fp32 pre-activations, acts.hid is not written.
void experts_forward_int8(ExpertActs& acts, const float* xg, const ExpertWeights& w,
                          const int64_t* offsets, const ExpertShape& s, ExpertWeightsInt8& wi,
                          ExpertScratchInt8& sc);

}  // namespace moe::detail
