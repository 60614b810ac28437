#include "quant/quant_matrix.hpp"

#include <vector>

#include "common/check.hpp"

namespace moe::detail {

namespace {
int64_t scale_bytes(QuantScale s) { return s == QuantScale::f16 ? 2 : s == QuantScale::e8m0 ? 1 : 4; }
}  // namespace

int64_t QuantMatrix::stored_bytes() const {
  const QuantFormat& f = fmt();
  const int64_t code_bytes = f.code_bits == 4 ? sub_blocks() * 16 : K;
  int64_t bytes = N * code_bytes + blocks_n() * blocks_k() * scale_bytes(f.scale);
  if (zero_points) bytes += N * blocks_k();
  return bytes;
}

void validate(const QuantMatrix& W) {
  const QuantFormat& f = W.fmt();
  MOE_REQUIRE(W.K > 0 && W.N > 0, f.name, " weight: K and N must be positive, got K = ", W.K,
              ", N = ", W.N);
  MOE_REQUIRE(W.block_k == 32 || W.block_k == 64 || (W.block_k > 0 && W.block_k % 128 == 0),
              f.name, " weight: block_k must be 32, 64 or a multiple of 128, got ", W.block_k);
  MOE_REQUIRE(f.code_bits == 4 || W.block_k % 128 == 0, f.name,
              " weight: 8-bit codes need blocks of a multiple of 128 along K, got ", W.block_k);
  MOE_REQUIRE(f.block_k == 0 || W.block_k == f.block_k, f.name, " weight: block_k must be ",
              f.block_k, ", got ", W.block_k);
  MOE_REQUIRE(W.codes && W.scales, f.name, " weight: codes and scales must be given");
  const int64_t need = f.code_bits == 4 ? W.sub_blocks() * 16 : W.K;
  MOE_REQUIRE(W.code_stride >= need, f.name, " weight: code_stride ", W.code_stride,
              " is below the ", need, " bytes a column of K = ", W.K, " takes");
  MOE_REQUIRE(W.scale_stride >= W.blocks_k(), f.name, " weight: scale_stride ", W.scale_stride,
              " is below the ", W.blocks_k(), " blocks along K");
  MOE_REQUIRE(!W.zero_points || (f.zero_points && W.zeros && W.zero_stride >= W.blocks_k()),
              f.name, " weight: zero points need a format that has them and zero_stride ≥ ",
              W.blocks_k());
  MOE_REQUIRE(!W.act_order || (W.format == QuantFormatId::int4 && W.perm), f.name,
              " weight: an act-order permutation is an int4 (GPTQ) feature and must be given");
}

double quant_value_at(const QuantMatrix& W, int64_t r, int64_t j) {
  const QuantFormat& f = W.fmt();
  int code;
  if (f.code_bits == 4) {
    const uint8_t b = W.codes[j * W.code_stride + r / 2];
    code = r % 2 ? b >> 4 : b & 15;
  } else {
    code = W.codes[j * W.code_stride + r];
  }
  const int64_t b = r / W.block_k;
  double v = quant_code_values(W.format)[code];
  if (f.linear_codes) v -= W.zero_points ? W.zeros[j * W.zero_stride + b] : 8;
  const double s = quant_scale_value(f.scale, W.scales, (j / f.block_n) * W.scale_stride + b);
  return v * s;
}

void quant_dequant_ref(const QuantMatrix& W, double* dst) {
  for (int64_t r = 0; r < W.K; ++r) {
    const int64_t k = W.act_order ? W.perm[r] : r;
    for (int64_t j = 0; j < W.N; ++j) dst[k * W.N + j] = quant_value_at(W, r, j);
  }
}

void quant_matmul_ref(const QuantMatrix& W, const double* A, int64_t M, double* C) {
  std::vector<double> Wd(static_cast<size_t>(W.K * W.N));
  quant_dequant_ref(W, Wd.data());
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < W.N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < W.K; ++k) acc += A[i * W.K + k] * Wd[k * W.N + j];
      C[i * W.N + j] = acc;
    }
}

}  // namespace moe::detail
