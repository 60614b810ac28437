// The thin tile layer the AMX kernels are written against (STYLE.md 17): configure, zero,
// load, store, tdpbf16ps and tdpbusd, with two implementations of the same interface:
//   AmxHw   the instructions themselves (inline assembly; run only where cpu() says amx);
//   AmxEmu  plain C++ with the instructions' semantics, bit for bit as Intel's SDM defines
//           them, so that every AMX kernel runs and is tested on any x86-64.
// A kernel is a template over the layer (kernels/amx_gemm.hpp); the tests run it through
// AmxEmu everywhere and compare AmxHw with AmxEmu bit for bit where AMX exists.
//
// Semantics reproduced by AmxEmu (SDM, "TDPBF16PS" and "TDPBUSD", palette 1):
// - a tile has `rows` rows of `colsb` bytes (≤ 16 × 64); a load reads that much and zeroes
//   the rest of the register; a store writes that much;
// - tdpbf16ps C += A·B: for each row m and column n, two fp32 partial sums, one over the even
//   and one over the odd bf16 of every pair k (k = 0 … A.colsb/4 − 1 in order), each an FMA
//   with round-to-nearest-even; then tmp = even + odd and C = C + tmp, each rounded. Input
//   denormals (the bf16 operands and C) are read as zero and every result that would be
//   denormal is flushed to zero (DAZ = FTZ = 1, MXCSR not consulted);
// - tdpbusd C += A·B with A's bytes unsigned and B's signed: the four byte products of a
//   dword summed into C in 32-bit two's-complement arithmetic (exact for libmoe's operands).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moe::detail {

// The 64-byte tile configuration of palette 1 (LDTILECFG's memory operand).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tiles 0…7 (8…15 reserved)
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

constexpr int kTileRows = 16;   // rows of a full tile
constexpr int kTileBytes = 64;  // bytes of a full tile row

struct AmxHw {
  static constexpr bool kHardware = true;
  static void config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c)); }
  static void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  // The memory clobbers order the tile traffic with the C++ accesses around it (GCC's own
  // intrinsics carry none).
  template <int T>
  static void load(const void* base, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>
  static void dpbf16ps() {
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  template <int C, int A, int B>
  static void dpbusd() {
    __asm__ volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};

struct AmxEmu {
  static constexpr bool kHardware = false;
  struct State {
    TileConfig cfg;
    alignas(64) uint8_t t[8][kTileRows][kTileBytes];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void config(const TileConfig& c) {
    State& s = state();
    s.cfg = c;
    std::memset(s.t, 0, sizeof(s.t));
  }
  static void release() { config(TileConfig{}); }
  template <int T>
  static void zero() {
    std::memset(state().t[T], 0, sizeof(state().t[T]));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    State& s = state();
    std::memset(s.t[T], 0, sizeof(s.t[T]));
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(s.t[T][r], static_cast<const uint8_t*>(base) + r * stride, s.cfg.colsb[T]);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    State& s = state();
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.t[T][r], s.cfg.colsb[T]);
  }
  template <int C, int A, int B>
  static void dpbf16ps() {
    State& s = state();
    const int rows = s.cfg.rows[C], cols = s.cfg.colsb[C] / 4, pairs = s.cfg.colsb[A] / 4;
    for (int m = 0; m < rows; ++m)
      for (int n = 0; n < cols; ++n) {
        float even = 0.0f, odd = 0.0f;
        for (int k = 0; k < pairs; ++k) {
          even = ftz(std::fma(bf16_daz(s.t[A][m], 2 * k), bf16_daz(s.t[B][k], 2 * n), even));
          odd = ftz(std::fma(bf16_daz(s.t[A][m], 2 * k + 1), bf16_daz(s.t[B][k], 2 * n + 1), odd));
        }
        float c;
        std::memcpy(&c, s.t[C][m] + 4 * n, 4);
        c = ftz(daz(c) + ftz(even + odd));
        std::memcpy(s.t[C][m] + 4 * n, &c, 4);
      }
  }
  template <int C, int A, int B>
  static void dpbusd() {
    State& s = state();
    const int rows = s.cfg.rows[C], cols = s.cfg.colsb[C] / 4, quads = s.cfg.colsb[A] / 4;
    for (int m = 0; m < rows; ++m)
      for (int n = 0; n < cols; ++n) {
        uint32_t acc;
        std::memcpy(&acc, s.t[C][m] + 4 * n, 4);
        for (int k = 0; k < quads; ++k)
          for (int i = 0; i < 4; ++i) {
            const int32_t a = s.t[A][m][4 * k + i];                          // unsigned byte
            const int32_t b = static_cast<int8_t>(s.t[B][k][4 * n + i]);     // signed byte
            acc += static_cast<uint32_t>(a * b);                              // wraps as the hardware
          }
        std::memcpy(s.t[C][m] + 4 * n, &acc, 4);
      }
  }

 private:
  static float ftz(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; }
  static float daz(float v) { return ftz(v); }
  // bf16 element i of a tile row, widened, a denormal read as zero.
  static float bf16_daz(const uint8_t* row, int i) {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return daz(v);
  }
};

}  // namespace moe::detail
