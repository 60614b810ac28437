// The products every low-bit format runs, written once for all rows of kQuantFormats:
//
//   decode   C (M, n) = rows (M, K) · dequant(W)[:, n0 : n0 + n] for few rows (M ≤ 16): the
//            stored bytes stream once, 128 values of a column (a chunk) at a time, and are
//            widened in registers.
//            avx512_vnni (4-bit codes where the CPU has VNNI; chosen by measurement): the
//            nibbles are the unsigned bytes vpdpbusd multiplies with int8 rows (mxfp4's through
//            a vpshufb table of 2·E2M1 + 12), two instructions a chunk and row, exact int32
//            sums; the zero point comes off as z · the rows' lane sums, and the weights' and
//            the rows' scales multiply the sum into fp32 accumulators.
//            avx512_bf16: 4-bit codes split into nibbles and looked up in a 16-entry bf16
//            table held as two vpshufb byte tables (low and high bytes, interleaved by
//            vpunpck*bw); 8-bit codes through a 128-entry table (two vpermi2w) and the sign
//            bit, or with AVX512-VBMI 64 at a time (two vpermi2b byte lookups, the sign, two
//            vpunpck*bw; rows in interleaved8 order: quant_vbmi). vdpbf16ps sums the exact widened values of a chunk into fp32; the chunk's
//            scale vector multiplies that sum into the accumulators (vfmadd), and int4's zero
//            points come off as z · Σ rows (the row sums per lane prepared with the rows).
//            On both, each 128-bit lane of a widened 4-bit chunk holds one 32-value
//            sub-block, so block scales below 128 are one vector per chunk; the rows are
//            gathered once per call into the order the widening leaves the values in.
//            avx512_vnni on a tiled matrix (quant_matrix.hpp; what the layer holds), one tile
//            at a time (one stream of bytes a thread): one 64-byte load is 8 values of 16
//            columns, its low and high nibbles two vpdpbusd
//            against 4 row bytes broadcast, into int32 lanes that are the 16 columns; the
//            rows are quantized per G = min(block_k, 128) values, so the float work (convert,
//            zero point, row and weight scales) is once per G values and 16 columns instead
//            of per 128 values and column. Hot on one Zen 4 core, int4 g128 K 2048 × N 1536:
//            1.3× (M 1) to 2.5× (M 16) the column kernel's rate (docs/quant.md, "Decode").
//            mxfp4 there with AVX512-VBMI (quant_vbmi): rows per 128, each column's exponent
//            shared over a chunk where its four lie within 2^3 (vpermb into shifted tables),
//            so one exact int32 sum and one fp32 step a chunk.
//            avx512 / avx2: fp32 rows, the weights widened to fp32 with the scale folded in,
//            vfmadd.
//            Columns are independent: a column's bits depend on the path and the layout only
//            — not on M, n0, n, the column split or the thread that ran it.
//   prefill  the same product for many rows: each panel of 64 columns and 2048 rows of K is
//            widened once per call into the caller's workspace, which stays in cache:
//            avx512_vnni (4-bit codes below AMX; quant/prefill_vnni.cpp): int8 rows (each 128
//            values quantized to their own scale, + 128 as u8) against a panel of the exact
//            signed values (int4: code − zero point; mxfp4: 2·E2M1) in experts/int8.hpp's
//            u8·s8 layout; vpdpbusd sums each scale block exactly in int32, then the block's
//            row and weight scales multiply it into fp32.
//            other paths: a bf16 panel in gemm_bf16_packed's layout (bf16(value · scale),
//            rounded to nearest even) handed to gemm_bf16_packed_serial (vdpbf16ps, or AMX
//            tiles on an AMX CPU). K is summed chunk after chunk in order.
//
// Rows are prepared once per call (quant_prepare_rows): rounded to bf16, quantized to int8 or
// kept fp32 as the path takes them, gathered into the kernel's K order (int4 act-order, and
// the decode's interleave), zero-padded to whole chunks.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/aligned.hpp"
#include "common/parallel.hpp"
#include "quant/quant_matrix.hpp"

namespace moe::detail {

// Which kernel runs M rows of a matrix of `format`: decode (registers) or prefill (panels). By
// measurement (docs/quant.md): decode up to kQuantDecodeMaxRows rows where prefill widens bf16
// panels, up to kQuantDecodeMaxRowsInt8 where it takes int8 panels (quant_prefill_path).
enum class QuantMethod : int { decode, prefill };

// Whether the decode kernels that need AVX512-VBMI run: fp8's on avx512_bf16 widens 64 codes at
// a time with vpermi2b (rows interleaved as kernels_impl.hpp's interleaved8_source says), and
// mxfp4's on a tiled matrix shares each column's exponent over 128 values where its four E8M0
// scales lie within 2^3 (vpermb into shifted tables; rows per 128: QuantRows::shared_exponents).
// Where the CPU has AVX512-VBMI, unless MOE_VBMI=0 (the kernels of CPUs without it, kept for
// them and for tests; any other value is refused by name).
bool quant_vbmi();

// Values per int8 row scale of the tiled decode (QuantRows::tiled): 128 for mxfp4 where
// quant_vbmi, else min(block_k, 128).
int64_t quant_tiled_row_block(const QuantMatrix& W);

// Whether a matrix held by the layer takes the tiled layout (quant_matrix.hpp): 4-bit codes,
// N a multiple of 16, and this CPU's decode path for the format avx512_vnni (whose tiled kernel
// reads it; every other path reads tiled matrices through quant_untiled). MOE_QUANT_TILED=0 in
// the environment keeps the column layout (for comparisons).
bool quant_tiling_wanted(const QuantMatrix& W);
constexpr int64_t kQuantDecodeMaxRows = 16;
constexpr int64_t kQuantDecodeMaxRowsInt8 = 8;
QuantMethod quant_method_for(int64_t M, QuantFormatId format);

// Values of K per decode chunk (one 64-byte load of 4-bit codes).
constexpr int64_t kQuantChunk = 128;

// Rows prepared for one matrix, path and method.
//   f32, bf16  (M, ld) in the kernel's K order; bf16 decode of 4-bit codes interleaved
//              within each chunk (kernels_impl.hpp: interleaved_source), with the lane sums
//              int4's zero points need.
//   s8         (avx512_vnni) per chunk 128 bytes: the 64 even values then the 64 odd ones (so
//              byte i of each half meets code byte i's low or high nibble), each 32 values
//              quantized to their own scale; per (row, chunk) 16 lane scales (lane t: its
//              sub-block's scale, times 1/2 for mxfp4's doubled codes) and 16 lane sums (the
//              int8 values lane t of vpdpbusd adds: values 8t .. 8t + 7).
//   u8         (prefill on avx512_vnni) (M, ld) bytes in K order, int8 per 128 values + 128,
//              and per (row, chunk) the scale (scales; M × chunks).
struct QuantRows {
  QuantPath path = QuantPath::avx2;
  QuantMethod method = QuantMethod::decode;
  bool interleaved = false;  // 4-bit decode on avx512_bf16 / avx512_vnni; fp8 where quant_vbmi
  // decode on avx512_vnni of a tiled matrix: int8 values as s8 rows, but one scale per G =
  // quant_tiled_row_block values, scales (M, ld / G) and sums (M, ld / G)
  bool tiled = false;
  // tiled mxfp4 where quant_vbmi: rows per 128 values (quant_tiled_row_block), sums 128 · Σ ·
  // the row scale (the weights' bytes are 2·E2M1·2^d + 128)
  bool shared_exponents = false;
  int64_t M = 0;             // rows
  int64_t ld = 0;            // elements between rows (whole chunks)
  const void* data = nullptr;  // float, uint16_t (bf16; prefill always) or int8_t
  // (M, chunks, 16): bf16 int4 with zero points, and s8 rows (there, for formats with one
  // fixed zero z, already z · Σ · the row scale)
  const float* sums = nullptr;
  const float* scales = nullptr;  // (M, chunks, 16): s8 rows
};

// The int8 quantization of s8 rows, per 32 values v: scale = max |v| / 127 (NaN when one is
// NaN), q = clamp(nearest-even(v / scale), −127, 127), 0 when the scale is 0.
float quant_s8_scale(const float* v, int64_t n);
int8_t quant_s8(float v, float scale);

// Bytes quant_prepare_rows writes for M rows of W on that path and method.
int64_t quant_rows_bytes(const QuantMatrix& W, QuantPath path, QuantMethod method, int64_t M);
// X (M, K) fp32 with stride ldx, in W's own K order → buf (quant_rows_bytes(W, path, method, M)
// bytes).
// Prefill rows are u8 on avx512_vnni, else bf16 in K order whatever the path.
QuantRows quant_prepare_rows(const QuantMatrix& W, QuantPath path, QuantMethod method,
                             const float* X, int64_t ldx, int64_t M, void* buf);

// Bytes of bf16 rows one decode pass keeps in L1 (rows per pass: 4 to 16).
constexpr int64_t kQuantDecodeRowBytes = 32 * 1024;

// C (M, n) = rows · dequant(W)[:, n0 : n0 + n] on the calling thread, with rows.path's kernel;
// C (stride ldc) points at column n0. Any M (rows in passes of up to 16 whose rows fit
// kQuantDecodeRowBytes on avx512_bf16, of up to 8 on the fp32 paths).
void quant_decode_serial(const QuantMatrix& W, const QuantRows& rows, int64_t n0, int64_t n,
                         float* C, int64_t ldc);

// The K rows of one prefill panel (a multiple of every block_k).
constexpr int64_t kQuantPanelK = 2048;
// uint16_t values of the workspace quant_prefill_serial needs (one widened panel).
int64_t quant_prefill_workspace_size(const QuantMatrix& W);
// C (M, n) = rows · dequant(W)[:, n0 : n0 + n] through widened bf16 panels and
// gemm_bf16_packed_serial; rows prepared for prefill (bf16, K order), `widen` picks the
// widening's instructions, ws holds quant_prefill_workspace_size(W) values.
// `next`: the panel the caller runs after this call (its matrix and first column; its first
// K panel), whose lines the last panel's products ask for ahead; by default W's next 64
// columns. Only a prefetch: the values never depend on it.
struct QuantNext {
  const QuantMatrix* W = nullptr;
  int64_t j = 0;
};
void quant_prefill_serial(const QuantMatrix& W, const QuantRows& rows, QuantPath widen,
                          int64_t n0, int64_t n, float* C, int64_t ldc, uint16_t* ws,
                          QuantNext next = {});

// The panel widening itself (public for tests): panel (packed_bf16_size(kc, 64) values) =
// the packed bf16 form of the (kc, 64) matrix whose (k, j) is bf16(value · scale) at kernel
// position k0 + k of column j0 + j, zero for j ≥ nc and in the padding.
void quant_widen_panel(const QuantMatrix& W, QuantPath widen, int64_t j0, int64_t nc, int64_t k0,
                       int64_t kc, uint16_t* panel);

// Columns per parallel task of quant_matmul_grouped (fixed: results never depend on the
// thread count).
constexpr int64_t kQuantTileN = 64;

// Whether a and b take the same rows (the same K order, N, format and block): one preparation
// serves both (QuantProduct's count 2).
bool quant_rows_shared(const QuantMatrix& a, const QuantMatrix& b);

// One product of a group: C_m (M, N) = X · dequant(W_m) for m < count (count 1, or 2 matrices
// that quant_rows_shared allows), then epilogue(ctx, n0, n) on each column tile's columns of
// all M rows while they are in cache (the bias, the activation, a GLU's product).
struct QuantProduct {
  const QuantMatrix* W[2] = {nullptr, nullptr};
  float* C[2] = {nullptr, nullptr};
  int count = 1;
  const float* X = nullptr;
  int64_t ldx = 0, M = 0, ldc = 0;
  void (*epilogue)(const void* ctx, int64_t n0, int64_t n) = nullptr;
  const void* ctx = nullptr;
  // The kernel: by quant_method_for and the CPU's paths (quant_decode_path, quant_prefill_path)
  // unless pinned (quant_matmul: tests and benchmarks run each path).
  bool pinned = false;
  QuantPath path = QuantPath::avx2;
  QuantMethod method = QuantMethod::decode;
};
// Buffers quant_matmul_grouped uses, grown to the largest group (reused call after call).
// The rows and panels start on 64-byte lines (AlignedScratch; each product's rows and each
// thread's panel at a multiple of 64 bytes from there): the bf16 decode loads a row's values
// 64 bytes at a time, and rows 16 bytes off a line (malloc's alignment from 128 KiB on) ran
// fp8's decode at 2.65-2.84 G vdpbf16ps/s against 3.63-4.24 on a line (one Zen 4 core, hot,
// K 2048, 4 and 8 rows; docs/quant.md).
struct QuantGroupWorkspace {
  AlignedScratch<unsigned char> rows;
  AlignedScratch<uint16_t> panels;  // one panel per thread
  std::vector<int64_t> offsets;
  std::vector<QuantRows> prepared;
  std::vector<std::pair<int32_t, int32_t>> tasks;
  std::vector<TaskShare> shares;  // the threads' shares of the tasks
};
// Every product of the group (an MoE layer's experts: each its own rows, method and path): the
// rows of all prepared, then all their (product, column tile of kQuantTileN) tasks in one
// parallel loop — no barrier per expert, and the threads' shares even over the whole layer. A
// column's bits depend on its product's path and method only, never on the group or threads.
void quant_matmul_grouped(const std::vector<QuantProduct>& ps, QuantGroupWorkspace& ws);

// C (M, N) = X (M, K) · dequant(W) with the kernel given (a path allowed on this CPU that
// reads W's format): one pinned product of quant_matmul_grouped. X is fp32 in W's own K order.
void quant_matmul(const QuantMatrix& W, QuantPath path, QuantMethod method, const float* X,
                  int64_t ldx, int64_t M, float* C, int64_t ldc, QuantGroupWorkspace& ws);

// "int4_g128_zp:avx512_bf16 (vpermw, vdpbf16ps)" and the like, for reports.
std::string quant_kernel_name(const QuantMatrix& W, QuantPath path);
// The prefill kernel on a path: "int4_g128_sym:avx512_vnni (int8 rows per 128 values, int8
// panels, vpdpbusd)", or the bf16 widening and the kernel its panels go to.
std::string quant_prefill_kernel_name(const QuantMatrix& W, QuantPath path);

}  // namespace moe::detail
