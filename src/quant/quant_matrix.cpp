#include "quant/quant_matrix.hpp"

#include <cstring>
#include <vector>

#include "common/check.hpp"
#include "common/cpu.hpp"
#include "quant/kernels_impl.hpp"

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
  MOE_REQUIRE(!W.tiled || (f.code_bits == 4 && f.block_n == 1 && W.N % kQuantTileCols == 0 &&
                           W.code_stride >= kQuantTileCols * need),
              f.name, " weight: the tiled layout needs 4-bit codes, N a multiple of ",
              kQuantTileCols, " (got ", W.N, ") and code_stride >= ", kQuantTileCols * need);
}

namespace {
// Where the layouts keep column j's byte i of codes, its block b's scale and zero point.
const uint8_t* code_byte(const QuantMatrix& W, int64_t j, int64_t i) {
  if (!W.tiled) return W.codes + j * W.code_stride + i;
  return W.codes + (j / kQuantTileCols) * W.code_stride + (i / 4) * 64 + (j % kQuantTileCols) * 4 +
         i % 4;
}
// Element (j, b) of a per-(column, block) array with `stride` elements a scale row (or a tile's
// block): at block_index(W, j, 0, stride) + b · block_step(W).
int64_t block_step(const QuantMatrix& W) { return W.tiled ? kQuantTileCols : 1; }
int64_t block_index(const QuantMatrix& W, int64_t j, int64_t b, int64_t stride) {
  if (!W.tiled) return (j / W.fmt().block_n) * stride + b;
  return ((j / kQuantTileCols) * stride + b) * kQuantTileCols + j % kQuantTileCols;
}
int64_t scale_index(const QuantMatrix& W, int64_t j, int64_t b) {
  return block_index(W, j, b, W.scale_stride);
}
int zero_at(const QuantMatrix& W, int64_t j, int64_t b) {
  return W.zeros[block_index(W, j, b, W.zero_stride)];  // int4: block_n is 1
}
}  // namespace

QuantMatrix quant_tiled(const QuantMatrix& W, QuantStorage& out) {
  MOE_ASSERT(!W.tiled);
  QuantMatrix t = W;
  t.tiled = true;
  const int64_t col = W.sub_blocks() * 16, tiles = W.N / kQuantTileCols, bk = W.blocks_k();
  const int64_t sb = scale_bytes(W.fmt().scale);
  t.code_stride = kQuantTileCols * col;
  t.scale_stride = bk;
  t.zero_stride = W.zero_points ? bk : 0;
  out.codes.resize(static_cast<size_t>(tiles * t.code_stride));
  out.scales.resize(static_cast<size_t>(W.N * bk * sb));
  out.zeros.resize(W.zero_points ? static_cast<size_t>(W.N * bk) : 0);
  for (int64_t j = 0; j < W.N; ++j) {
    const int64_t tile = j / kQuantTileCols, c = j % kQuantTileCols;
    uint8_t* dst = out.codes.data() + tile * t.code_stride + 4 * c;
    const uint8_t* src = W.codes + j * W.code_stride;
    for (int64_t s = 0; s < col / 4; ++s) std::memcpy(dst + 64 * s, src + 4 * s, 4);
    for (int64_t b = 0; b < bk; ++b) {
      const int64_t to = (tile * bk + b) * kQuantTileCols + c;
      std::memcpy(out.scales.data() + to * sb,
                  static_cast<const uint8_t*>(W.scales) + (j * W.scale_stride + b) * sb,
                  static_cast<size_t>(sb));
      if (W.zero_points) out.zeros[static_cast<size_t>(to)] = W.zeros[j * W.zero_stride + b];
    }
  }
  t.codes = out.codes.data();
  t.scales = out.scales.data();
  t.zeros = W.zero_points ? out.zeros.data() : nullptr;
  validate(t);
  return t;
}

QuantMatrix quant_untiled(const QuantMatrix& W, int64_t j0, int64_t n, QuantStorage& out) {
  const QuantFormat& f = W.fmt();
  MOE_ASSERT(j0 >= 0 && n >= 1 && j0 + n <= W.N && f.code_bits == 4);
  const int64_t col = W.sub_blocks() * 16, bk = W.blocks_k(), sb = scale_bytes(f.scale);
  QuantMatrix u = W;
  u.tiled = false;
  u.N = n;
  u.code_stride = col;
  u.scale_stride = bk;
  u.zero_stride = W.zero_points ? bk : 0;
  out.codes.resize(static_cast<size_t>(n * col));
  out.scales.resize(static_cast<size_t>(n * bk * sb));
  out.zeros.resize(W.zero_points ? static_cast<size_t>(n * bk) : 0);
  // Whole tiles by the AVX-512 transpose where the CPU has it (the layer tiles only there).
  const bool whole = W.tiled && j0 % kQuantTileCols == 0 && n % kQuantTileCols == 0 &&
                     isa_at_least(Isa::avx512);
  if (whole) {
    quant_impl::untile_codes_avx512(W, j0 / kQuantTileCols, n / kQuantTileCols, out.codes.data());
  } else if (W.tiled) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t s = 0; s < col / 4; ++s)
        std::memcpy(out.codes.data() + j * col + 4 * s, code_byte(W, j0 + j, 4 * s), 4);
  } else {
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(out.codes.data() + j * col, W.codes + (j0 + j) * W.code_stride,
                  static_cast<size_t>(col));
  }
  const auto* scales = static_cast<const uint8_t*>(W.scales);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t first = scale_index(W, j0 + j, 0), step = block_step(W);
    uint8_t* ds = out.scales.data() + j * bk * sb;
    if (sb == 2) {
      const auto* src = reinterpret_cast<const uint16_t*>(scales) + first;
      auto* d = reinterpret_cast<uint16_t*>(ds);
      for (int64_t b = 0; b < bk; ++b) d[b] = src[b * step];
    } else {
      for (int64_t b = 0; b < bk; ++b) std::memcpy(ds + b * sb, scales + (first + b * step) * sb, static_cast<size_t>(sb));
    }
    if (W.zero_points) {
      const uint8_t* z = W.zeros + block_index(W, j0 + j, 0, W.zero_stride);
      for (int64_t b = 0; b < bk; ++b) out.zeros[static_cast<size_t>(j * bk + b)] = z[b * step];
    }
  }
  u.codes = out.codes.data();
  u.scales = out.scales.data();
  u.zeros = W.zero_points ? out.zeros.data() : nullptr;
  return u;
}

double quant_value_at(const QuantMatrix& W, int64_t r, int64_t j) {
  const QuantFormat& f = W.fmt();
  int code;
  if (f.code_bits == 4) {
    const uint8_t b = *code_byte(W, j, r / 2);
    code = r % 2 ? b >> 4 : b & 15;
  } else {
    code = *code_byte(W, j, r);
  }
  const int64_t b = r / W.block_k;
  double v = quant_code_values(W.format)[code];
  if (f.linear_codes) v -= W.zero_points ? zero_at(W, j, b) : 8;
  const double s = quant_scale_value(f.scale, W.scales, scale_index(W, j, b));
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
