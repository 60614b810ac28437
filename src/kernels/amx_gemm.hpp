// The AMX product over packed weight panels, written once for bf16 (tdpbf16ps) and u8·s8
// (tdpbusd) against the tile layer of kernels/amx_tile.hpp, and instantiated for the
// instructions (AmxHw) and for their emulation (AmxEmu).
//
// Both packed weight layouts have the same byte geometry (common/gemm_bf16_packed.hpp,
// experts/int8.hpp): panels of 64 columns, each a run of 256-byte rows, one row per K step
// of the instruction's dword (a pair of bf16 rows, or a group of 4 int8 rows), 64 columns × 4
// bytes. So a B tile (16 K steps × 16 columns × 4 bytes) is a tileloadd at stride 256 from
// the panel, with no repacking, and an A tile is 16 rows × 64 bytes of the activations (32
// bf16 or 64 u8 values of K). The panels' K is padded to a whole tile (32 bf16 rows, 64 int8
// rows) with zeros.
//
// Blocking (constants only, never the thread count): row blocks of 32 (two A tiles) against
// column groups of 32 (two B tiles), four C tiles; a row block of at most 16 rows runs one A
// tile against a whole panel of 64 columns (four C tiles, the B tiles' rows read whole).
// With more than 32 rows, K runs in blocks of 512 bytes of A (256 bf16 values) so that an
// A block and a column group's B block stay in L1 while every row block reuses the B block
// from L2; C is kept in the output between K blocks. Every C element is the same sequence of
// instructions over its K chunks in order, whatever the variant, the block or the rows that
// share it: a row's bits do not depend on M or on which call computed it.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/amx_tile.hpp"

namespace moe::detail {

enum class AmxOp { bf16, u8s8 };

// C (M, n) = A (M, ·) · B (+ C when accumulate), C fp32 (bf16) or int32 (u8s8), stride ldc
// elements. A: M rows with stride lda bytes, each with `a_bytes` valid bytes (K·2 or K4·4);
// the bytes up to kbytes (a multiple of 64) are read as `pad` (0 for bf16; 128, the zero of
// the u8 offset, for u8s8). B: the first panel of the n columns, panels panel_bytes apart,
// kbytes/64·16 rows of 256 bytes each.
struct AmxGemmArgs {
  int64_t M = 0, n = 0, kbytes = 0;
  const uint8_t* A = nullptr;
  int64_t lda = 0, a_bytes = 0;
  uint8_t pad = 0;
  const uint8_t* B = nullptr;
  int64_t panel_bytes = 0;
  bool accumulate = false;
  void* C = nullptr;
  int64_t ldc = 0;
};

namespace amx_impl {

constexpr int kC0 = 0, kC1 = 1, kC2 = 2, kC3 = 3, kA0 = 4, kA1 = 5, kB0 = 6, kB1 = 7;
constexpr int64_t kRowBytesB = 256;     // one K step of a panel
constexpr int64_t kChunkB = 16 * kRowBytesB;  // one tile's K steps of a panel
constexpr int64_t kKBlock = 512;        // bytes of A per K block (more than 32 rows)
constexpr int64_t kRegionRows = 128, kRegionCols = 256;  // C regions (more than 32 rows)
// The weights stream from memory (a model's experts do not fit in cache) and a tile load
// waits for its 16 lines: each chunk asks for the B lines kAhead chunks on (16 KiB of a
// panel) into L2, as the AVX-512 kernel prefetches its next panel. Not measured on AMX
// hardware yet (docs/design.md).
constexpr int64_t kAhead = 4;

// The lines of `cols` bytes (64 or 128, from col0) of the 16 panel rows of chunk c, into L2
// (only where the panel has them).
inline void prefetch_chunk(const uint8_t* panel, int64_t chunks, int64_t c, int64_t col0,
                           int64_t bytes) {
  if (c >= chunks) return;
  const uint8_t* b = panel + c * kChunkB + col0;
  for (int r = 0; r < 16; ++r)
    for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(b + r * kRowBytesB + l, 0, 2);
}

template <class Tiles, AmxOp op, int C, int A, int B>
inline void dp() {
  if constexpr (op == AmxOp::bf16)
    Tiles::template dpbf16ps<C, A, B>();
  else
    Tiles::template dpbusd<C, A, B>();
}

// C tile T at rows [r0, r0 + rows) × columns [c0, c0 + cols) of C (4-byte elements): loaded
// or stored directly when whole, through a staging tile at the edges.
template <class Tiles, int T>
inline void c_load(const AmxGemmArgs& g, int64_t r0, int rows, int64_t c0, int cols, bool from_c) {
  if (!from_c) return Tiles::template zero<T>();
  auto* c = static_cast<uint8_t*>(g.C) + (r0 * g.ldc + c0) * 4;
  if (rows == kTileRows && cols == 16) return Tiles::template load<T>(c, g.ldc * 4);
  alignas(64) uint8_t stage[kTileRows][kTileBytes] = {};
  for (int r = 0; r < rows; ++r) std::memcpy(stage[r], c + r * g.ldc * 4, static_cast<size_t>(cols) * 4);
  Tiles::template load<T>(stage, kTileBytes);
}
template <class Tiles, int T>
inline void c_store(const AmxGemmArgs& g, int64_t r0, int rows, int64_t c0, int cols) {
  auto* c = static_cast<uint8_t*>(g.C) + (r0 * g.ldc + c0) * 4;
  if (rows == kTileRows && cols == 16) return Tiles::template store<T>(c, g.ldc * 4);
  alignas(64) uint8_t stage[kTileRows][kTileBytes];
  Tiles::template store<T>(stage, kTileBytes);
  for (int r = 0; r < rows; ++r) std::memcpy(c + r * g.ldc * 4, stage[r], static_cast<size_t>(cols) * 4);
}

inline int clip(int64_t v, int64_t hi) { return static_cast<int>(std::clamp<int64_t>(v, 0, hi)); }

// Rows [m0, m0 + rows ≤ 16) against the whole panel p (columns [64p, 64p + 64) ∩ [0, n)),
// K bytes [k0, k1): C tiles 0…3 are the panel's four column tiles, the B tiles rotate.
template <class Tiles, AmxOp op>
void block_wide(const AmxGemmArgs& g, const uint8_t* a, int64_t lda, int64_t m0, int rows,
                int64_t p, int64_t k0, int64_t k1, bool from_c) {
  const int64_t c0 = 64 * p;
  const int cols[4] = {clip(g.n - c0, 16), clip(g.n - c0 - 16, 16), clip(g.n - c0 - 32, 16),
                       clip(g.n - c0 - 48, 16)};
  c_load<Tiles, kC0>(g, m0, rows, c0, cols[0], from_c);
  if (cols[1]) c_load<Tiles, kC1>(g, m0, rows, c0 + 16, cols[1], from_c);
  if (cols[2]) c_load<Tiles, kC2>(g, m0, rows, c0 + 32, cols[2], from_c);
  if (cols[3]) c_load<Tiles, kC3>(g, m0, rows, c0 + 48, cols[3], from_c);
  const uint8_t* panel = g.B + p * g.panel_bytes;
  const int64_t chunks = g.kbytes / kTileBytes;
  for (int64_t k = k0; k < k1; k += kTileBytes) {
    const uint8_t* b = panel + (k / kTileBytes) * kChunkB;
    prefetch_chunk(panel, chunks, k / kTileBytes + kAhead, 0, kRowBytesB);
    Tiles::template load<kA0>(a + k, lda);
    Tiles::template load<kB0>(b, kRowBytesB);
    dp<Tiles, op, kC0, kA0, kB0>();
    if (cols[1]) {
      Tiles::template load<kB1>(b + 64, kRowBytesB);
      dp<Tiles, op, kC1, kA0, kB1>();
    }
    if (cols[2]) {
      Tiles::template load<kA1>(b + 128, kRowBytesB);  // A1 is free here: a third B tile
      dp<Tiles, op, kC2, kA0, kA1>();
    }
    if (cols[3]) {
      Tiles::template load<kB0>(b + 192, kRowBytesB);
      dp<Tiles, op, kC3, kA0, kB0>();
    }
  }
  c_store<Tiles, kC0>(g, m0, rows, c0, cols[0]);
  if (cols[1]) c_store<Tiles, kC1>(g, m0, rows, c0 + 16, cols[1]);
  if (cols[2]) c_store<Tiles, kC2>(g, m0, rows, c0 + 32, cols[2]);
  if (cols[3]) c_store<Tiles, kC3>(g, m0, rows, c0 + 48, cols[3]);
}

// Rows [m0, m0 + 16 + rows1) (rows1 ≤ 16) against columns [c0, c0 + 32) ∩ [0, n): two A
// tiles by two B tiles.
template <class Tiles, AmxOp op>
void block_square(const AmxGemmArgs& g, const uint8_t* a, int64_t lda, int64_t m0, int rows1,
                  int64_t c0, int64_t k0, int64_t k1, bool from_c) {
  const int cols0 = clip(g.n - c0, 16), cols1 = clip(g.n - c0 - 16, 16);
  c_load<Tiles, kC0>(g, m0, kTileRows, c0, cols0, from_c);
  c_load<Tiles, kC2>(g, m0 + 16, rows1, c0, cols0, from_c);
  if (cols1) {
    c_load<Tiles, kC1>(g, m0, kTileRows, c0 + 16, cols1, from_c);
    c_load<Tiles, kC3>(g, m0 + 16, rows1, c0 + 16, cols1, from_c);
  }
  const uint8_t* panel = g.B + (c0 / 64) * g.panel_bytes + (c0 % 64) * 4;
  const uint8_t* a1 = a + 16 * lda;
  const int64_t chunks = g.kbytes / kTileBytes;
  for (int64_t k = k0; k < k1; k += kTileBytes) {
    const uint8_t* b = panel + (k / kTileBytes) * kChunkB;
    prefetch_chunk(panel, chunks, k / kTileBytes + kAhead, 0, 128);
    Tiles::template load<kA0>(a + k, lda);
    Tiles::template load<kB0>(b, kRowBytesB);
    dp<Tiles, op, kC0, kA0, kB0>();
    Tiles::template load<kA1>(a1 + k, lda);
    dp<Tiles, op, kC2, kA1, kB0>();
    if (cols1) {
      Tiles::template load<kB1>(b + 64, kRowBytesB);
      dp<Tiles, op, kC1, kA0, kB1>();
      dp<Tiles, op, kC3, kA1, kB1>();
    }
  }
  c_store<Tiles, kC0>(g, m0, kTileRows, c0, cols0);
  c_store<Tiles, kC2>(g, m0 + 16, rows1, c0, cols0);
  if (cols1) {
    c_store<Tiles, kC1>(g, m0, kTileRows, c0 + 16, cols1);
    c_store<Tiles, kC3>(g, m0 + 16, rows1, c0 + 16, cols1);
  }
}

}  // namespace amx_impl

template <class Tiles, AmxOp op>
void amx_gemm(const AmxGemmArgs& g) {
  using namespace amx_impl;
  if (g.M <= 0 || g.n <= 0) return;
  // A as the tiles read it: rows whole to a multiple of 16 and K to kbytes. In place when it
  // already is; otherwise the rows that are not (all of them when K is not whole, else the
  // last partial tile's) are copied, padded, into a thread's buffer.
  thread_local std::vector<uint8_t> abuf;
  const int64_t M16 = (g.M + kTileRows - 1) / kTileRows * kTileRows;
  const bool k_whole = g.a_bytes == g.kbytes;
  const int64_t copy_from = k_whole ? g.M / kTileRows * kTileRows : 0;
  if (copy_from < g.M) {
    abuf.assign(static_cast<size_t>((M16 - copy_from) * g.kbytes), g.pad);
    for (int64_t r = copy_from; r < g.M; ++r)
      std::memcpy(abuf.data() + (r - copy_from) * g.kbytes, g.A + r * g.lda,
                  static_cast<size_t>(g.a_bytes));
  }
  // The A rows from m0 (a multiple of 16) and their stride.
  auto a_rows = [&](int64_t m0, int64_t* lda) -> const uint8_t* {
    if (m0 >= copy_from) {
      *lda = g.kbytes;
      return abuf.data() + (m0 - copy_from) * g.kbytes;
    }
    *lda = g.lda;
    return g.A + m0 * g.lda;
  };

  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = kTileBytes;
  }
  Tiles::config(cfg);
  // Above 32 rows C is produced in regions of 128 rows × 256 columns (128 KiB of fp32 or
  // int32), each over all of K before the next: a region's C stays in L2 between K blocks
  // instead of going to memory and back once per K block.
  const int64_t kblock = g.M > 32 ? kKBlock : g.kbytes;
  const int64_t region_rows = g.M > 32 ? kRegionRows : g.M, region_cols = g.M > 32 ? kRegionCols : g.n;
  for (int64_t r0 = 0; r0 < g.M; r0 += region_rows)
    for (int64_t c0 = 0; c0 < g.n; c0 += region_cols) {
      const int64_t r1 = std::min(g.M, r0 + region_rows), c1 = std::min(g.n, c0 + region_cols);
      for (int64_t k0 = 0; k0 < g.kbytes; k0 += kblock) {
        const int64_t k1 = std::min(g.kbytes, k0 + kblock);
        const bool from_c = k0 > 0 || g.accumulate;
        for (int64_t m0 = r0; m0 < r1; m0 += 32) {
          const int64_t rows = std::min<int64_t>(32, r1 - m0);
          int64_t lda;
          const uint8_t* a = a_rows(m0, &lda);
          if (rows <= 16) {
            for (int64_t p = c0 / 64; p * 64 < c1; ++p)
              block_wide<Tiles, op>(g, a, lda, m0, static_cast<int>(rows), p, k0, k1, from_c);
          } else if (m0 + 16 >= copy_from && m0 < copy_from) {
            // A square block reads its second tile 16 rows after its first: here the first
            // is in place and the second in the buffer, so they run as two wide blocks.
            for (int64_t h = 0; h < 2; ++h) {
              const int64_t mh = m0 + 16 * h;
              int64_t ldh;
              const uint8_t* ah = a_rows(mh, &ldh);
              const int r = static_cast<int>(std::min<int64_t>(16, r1 - mh));
              for (int64_t p = c0 / 64; p * 64 < c1; ++p)
                block_wide<Tiles, op>(g, ah, ldh, mh, r, p, k0, k1, from_c);
            }
          } else {
            for (int64_t cg = c0; cg < c1; cg += 32)
              block_square<Tiles, op>(g, a, lda, m0, static_cast<int>(rows - 16), cg, k0, k1,
                                      from_c);
          }
        }
      }
    }
  Tiles::release();
}

}  // namespace moe::detail

namespace moe::detail {
// amx_gemm on the instructions (emulated = false: only where cpu() says amx) or on their
// emulation (any CPU).
void amx_gemm_run(const AmxGemmArgs& g, AmxOp op, bool emulated);
}  // namespace moe::detail
