#include "experts/precision.hpp"

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/gemm_bf16_packed.hpp"

namespace moe::detail {

namespace {
// (K, N) of matrix 1 (W1), 2 (W2) or 3 (W3) of a stack of shape s.
void matrix_dims(int matrix, const ExpertShape& s, int64_t* K, int64_t* N) {
  const int64_t mid = s.kind == ExpertKind::linear_relu ? s.Do : s.F;
  *K = matrix == 2 ? s.F : s.d;
  *N = matrix == 1 ? mid : matrix == 2 ? s.Do : s.F;
}
const char* const kMatrixName[] = {"", "W1", "W2", "W3"};
}  // namespace

void ExpertPrecision::hold_only(const ExpertShape& s, bool zero) {
  if (is_low_bit())
    quant.hold_only(s);
  else if (is_int8())
    int8.hold_only(s);
  else if (is_bf16())
    bf16.hold_only(s, zero);
}

void ExpertPrecision::assign(int matrix, int64_t e, const float* src, const ExpertShape& s) {
  MOE_ASSERT(matrix >= 1 && matrix <= 3);
  if (is_low_bit())
    quant.assign(matrix, e, src, s);
  else if (is_int8())
    int8.assign(kMatrixName[matrix], e, src);
  else if (is_bf16())
    bf16.assign(matrix, e, src, s);
}

void ExpertPrecision::assign_bf16(int matrix, int64_t e, const uint16_t* src, int64_t s_in,
                                  int64_t s_out, const ExpertShape& s) {
  MOE_ASSERT(is_bf16() && matrix >= 1 && matrix <= 3);
  bf16.assign_bf16(matrix, e, src, s_in, s_out, s);
}

void ExpertPrecision::assign_stored(int matrix, int64_t e, const QuantMatrix& v,
                                    const ExpertShape& s) {
  MOE_ASSERT(is_low_bit());
  quant.assign_stored(matrix, e, v, s);
}

void ExpertPrecision::read(int matrix, float* out, const ExpertShape& s) const {
  if (is_low_bit()) return quant.read(matrix, out, s);
  int64_t K, N;
  matrix_dims(matrix, s, &K, &N);
  if (is_int8()) {
    const Int8Stack& st = matrix == 1 ? int8.W1 : matrix == 2 ? int8.W2 : int8.W3;
    const int64_t cols = st.NB * Int8Stack::kCols;
    for (int64_t e = 0; e < s.E; ++e)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j)
          out[(e * K + k) * N + j] = static_cast<float>(st.at(e, k, j)) * st.scale[e * cols + j];
    return;
  }
  MOE_ASSERT(is_bf16());
  const PackedStack& st = matrix == 1 ? bf16.W1 : matrix == 2 ? bf16.W2 : bf16.W3;
  const int64_t size = packed_bf16_size(K, N);
  for (int64_t e = 0; e < s.E; ++e)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j)
        out[(e * K + k) * N + j] = from_bf16(st[e * size + packed_bf16_index(K, k, j)]);
}

void ExpertPrecision::fix_from(const ExpertWeights& w, const ExpertShape& s) {
  if (is_low_bit()) {  // kept when current (e.g. a checkpoint's bytes): quantizing is costly
    quant.prepare(w, s);
    quant.fixed = true;
  } else if (is_int8()) {
    int8.invalidate();
    int8.prepare(w, s);
    int8.fixed = true;
  } else if (is_bf16()) {
    bf16.invalidate();
    bf16.prepare_forward(w, s);
    bf16.fixed = true;
  }
}

int64_t ExpertPrecision::held_bytes() const {
  if (is_low_bit()) return quant.bytes();
  if (is_int8()) return int8.bytes();
  if (is_bf16())
    return static_cast<int64_t>((bf16.W1.size() + bf16.W2.size() + bf16.W3.size()) *
                                sizeof(uint16_t));
  return 0;
}

}  // namespace moe::detail
