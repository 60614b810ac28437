// One low-bit weight matrix as the kernels read it: a view of bytes held elsewhere (a kernel
// type's Weights, or a checkpoint's stored tensors read in place), in the layout of
// quant/format.hpp. Nothing here owns memory.
//
// Layout, for W (K, N) of a format F (S = ceil(K / 32) sub-blocks of 32 values along K):
//   codes  column j's codes start at codes + j·code_stride. 4-bit: byte i holds k = 2i (low
//          nibble) and 2i + 1 (high nibble), and every column has S·16 bytes (K padded to 32;
//          the padding codes are read and multiplied by zero rows). 8-bit: byte k is k, and
//          a column has K bytes (as stored: the tail of the last sub-block is a masked read).
//   scales the scale of columns [r·block_n, (r+1)·block_n) and block b = k / block_k at
//          element r·scale_stride + b (fp16, E8M0 or fp32 as the format says).
//   zeros  int4 with zero points: zero (j, b) at zeros[j·zero_stride + b], one byte 0..15;
//          without them the zero point is 8 (value = code − 8).
//   perm   int4 in GPTQ act-order: kernel position r along K holds W's row perm[r] (the rows
//          sorted by group so that each group is contiguous); the rows are gathered in that
//          order on entry (quant_prepare_rows), the weights never are.
//
// Tiled (4-bit codes, N a multiple of 16; the layer holds its int4 and mxfp4 matrices so where
// the decode path is avx512_vnni, quant_tiling_wanted): the same bytes regrouped so that decode
// reads 16 columns at once with no per-column reduction (docs/quant.md, "Decode"):
//   codes  tile t (columns 16t .. 16t + 15) starts at codes + t·code_stride; its step s (values
//          8s .. 8s + 7 along K) is 64 bytes at + 64s, column c's 4 bytes at + 64s + 4c, and
//          those are the column's bytes 4s .. 4s + 3 of the layout above (byte i: values 2i
//          and 2i + 1), so a tile is 16 columns' codes interleaved 4 bytes at a time.
//   scales the scale of column j and block b at element ((j / 16)·scale_stride + b)·16 + j % 16.
//   zeros  the same with zero_stride.
// Every consumer but the tiled decode kernel reads tiled matrices through quant_untiled.
#pragma once
#include <cstdint>
#include <vector>

#include "common/aligned.hpp"

#include "quant/format.hpp"

namespace moe::detail {

struct QuantMatrix {
  QuantFormatId format = QuantFormatId::int4;
  int64_t K = 0, N = 0;  // W is (K, N): K inputs, N outputs
  int64_t block_k = 0;   // K values per scale (a multiple of 32)
  const uint8_t* codes = nullptr;
  int64_t code_stride = 0;  // bytes
  const void* scales = nullptr;
  int64_t scale_stride = 0;  // elements
  bool zero_points = false;  // int4: zeros holds one zero point per (column, block)
  const uint8_t* zeros = nullptr;
  int64_t zero_stride = 0;  // bytes
  bool act_order = false;   // int4: perm holds the K order of the rows
  const int32_t* perm = nullptr;
  bool tiled = false;  // 4-bit codes in tiles of 16 columns (above)

  const QuantFormat& fmt() const { return quant_format(format); }
  int64_t sub_blocks() const { return (K + 31) / 32; }
  int64_t blocks_k() const { return (K + block_k - 1) / block_k; }  // scales along K
  int64_t blocks_n() const {                                        // scale rows
    const int64_t bn = fmt().block_n;
    return (N + bn - 1) / bn;
  }
  // Bytes a full read of the matrix touches: codes, scales and zero points (padding included).
  int64_t stored_bytes() const;
};

// Checks the view's sizes and strides against its format (moe::Error naming the field).
void validate(const QuantMatrix& W);

// Columns per tile of the tiled layout.
constexpr int64_t kQuantTileCols = 16;

// Bytes a view points into, owned (quant_tiled, quant_untiled).
// Bytes on 64-byte lines (common/aligned.hpp): what the layer holds and the kernels read.
using QuantBytes = std::vector<uint8_t, AlignedAllocator<uint8_t>>;
struct QuantStorage {
  QuantBytes codes, scales, zeros;
};
// W (not tiled; 4-bit codes, N a multiple of 16) regrouped into tiles in `out`: the returned
// view reads out's bytes (and W's perm).
QuantMatrix quant_tiled(const QuantMatrix& W, QuantStorage& out);
// Columns [j0, j0 + n) of W (tiled or not) in the column layout, in `out`: a view of n columns.
QuantMatrix quant_untiled(const QuantMatrix& W, int64_t j0, int64_t n, QuantStorage& out);

// The float64 value at kernel position r along K (W's row perm[r] in act-order, else row r) of
// column j, from the stored bytes: the reference every kernel is tested against.
double quant_value_at(const QuantMatrix& W, int64_t r, int64_t j);

// dst (K, N) row-major = dequant(W) in W's own row order (the act-order permutation undone).
void quant_dequant_ref(const QuantMatrix& W, double* dst);

// C (M, N) = A (M, K) · dequant(W) in float64, obvious loops (the twin of every kernel path;
// give it A rounded as the path rounds its rows). A in W's own K order.
void quant_matmul_ref(const QuantMatrix& W, const double* A, int64_t M, double* C);

}  // namespace moe::detail
