// Low-bit weight formats (SPEC §6: "int4", "mxfp4", "fp8") as data: one row per format in
// kQuantFormats, read by one decode loop and one panel widener (quant/kernels.hpp), not a copy
// of the loop per format. What a format is, how it is laid out and what was measured:
// docs/quant.md.
//
// Every format stores a weight W (K, N) — "in × out" as everywhere in libmoe — the way the
// checkpoints that carry it do: output-major ("N-major"), each output column j a run of codes
// along K, cut into blocks of block_k values that share one scale (and, for int4 with zero
// points, one zero point):
//   value(k, j) = (code(k, j) − zero(j, k / block_k)) · scale(j / block_n, k / block_k)
// with code → value through the format's code table (int4: the integer itself; mxfp4: E2M1;
// fp8: E4M3). 4-bit codes sit two a byte, the even k in the low nibble (GPT-OSS's `_blocks`;
// libmoe's int4 uses the same order).
#pragma once
#include <array>
#include <cstdint>
#include <limits>

namespace moe::detail {

enum class QuantFormatId : int { int4 = 0, mxfp4 = 1, fp8 = 2 };

// How a format stores its scales.
enum class QuantScale : int {
  f16,   // IEEE half (int4: libmoe's, GPTQ's and AWQ's `scales`)
  e8m0,  // a biased power of two, 2^(s − 127), 255 = NaN (OCP MX: GPT-OSS `_scales`)
  f32,   // IEEE single (DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv`)
};

// One row of the table.
struct QuantFormat {
  QuantFormatId id;
  const char* name;       // the precision name of SPEC §6
  int code_bits;          // 4 or 8
  QuantScale scale;       // how a scale is stored
  int block_k;            // K values per scale; 0: chosen per matrix (int4's group: 32, 64, 128)
  int block_n;            // output columns per scale
  bool linear_codes;      // code value = the code itself (int4; a zero point may be subtracted)
  bool zero_points;       // may carry a zero point per block (else int4's is 8)
  const char* stored_as;  // for reports
};

inline constexpr QuantFormat kQuantFormats[] = {
    {QuantFormatId::int4, "int4", 4, QuantScale::f16, 0, 1, true, true,
     "libmoe group-wise; GPTQ / AWQ repacked"},
    {QuantFormatId::mxfp4, "mxfp4", 4, QuantScale::e8m0, 32, 1, false, false,
     "GPT-OSS _blocks / _scales, read as stored"},
    {QuantFormatId::fp8, "fp8", 8, QuantScale::f32, 128, 128, false, false,
     "DeepSeek-V3 / Qwen3-FP8 weight + weight_scale_inv, read as stored"},
};

constexpr const QuantFormat& quant_format(QuantFormatId id) {
  return kQuantFormats[static_cast<int>(id)];
}

// ---- code and scale values (exact, portable: the twins and the tables are built from these)

namespace quant_bits {
constexpr float pow2(int e) {
  float v = 1.0f;
  for (; e > 0; --e) v *= 2.0f;
  for (; e < 0; ++e) v *= 0.5f;
  return v;
}
}  // namespace quant_bits

// E2M1 (OCP MX FP4): sign, 2 exponent bits (bias 1), 1 mantissa bit; no infinities, no NaN.
constexpr float e2m1_value(int code) {
  const int e = (code >> 1) & 3, m = code & 1;
  const float v = e == 0 ? 0.5f * static_cast<float>(m)
                         : (1.0f + 0.5f * static_cast<float>(m)) * quant_bits::pow2(e - 1);
  return (code & 8) ? -v : v;
}

// E4M3FN (OCP FP8, "float8_e4m3fn"): sign, 4 exponent bits (bias 7), 3 mantissa bits;
// subnormals below 2^-6; S.1111.111 is NaN, no infinities; largest 448.
constexpr float e4m3_value(int code) {
  const int e = (code >> 3) & 15, m = code & 7;
  const float v = e == 15 && m == 7 ? std::numeric_limits<float>::quiet_NaN()
                  : e == 0          ? static_cast<float>(m) * quant_bits::pow2(-9)
                                    : (1.0f + static_cast<float>(m) / 8.0f) * quant_bits::pow2(e - 7);
  return (code & 0x80) ? -v : v;  // NaN keeps the sign bit too
}

// E8M0: 2^(s − 127); 255 is NaN. 2^-127 is an fp32 subnormal, exact.
constexpr float e8m0_value(uint8_t s) {
  return s == 255 ? std::numeric_limits<float>::quiet_NaN() : quant_bits::pow2(int{s} - 127);
}

// IEEE half → single, exact.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {  // zero or subnormal: m · 2^-24
    float v = static_cast<float>(m) * quant_bits::pow2(-24);
    __builtin_memcpy(&u, &v, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Single → half, rounded to nearest even; beyond 65504 (after rounding) infinite, NaN stays NaN.
uint16_t f32_to_f16(float f);

// A format's code → value table: 16 entries for 4-bit codes, 256 for 8-bit ones.
// int4's entries are the codes themselves (0..15): the zero point is subtracted separately.
const std::array<float, 256>& quant_code_values(QuantFormatId id);

// The value of one stored scale (fp16, E8M0 or fp32 bits) as fp32, exact.
float quant_scale_value(QuantScale s, const void* scales, int64_t index);

// ---- kernel paths: which instructions a kernel runs, and the activations it takes ----------

// avx512_vnni: int8 rows (each 32 values quantized to their own scale, max |x| / 127, nearest
//   even), vpdpbusd against the 4-bit codes as unsigned bytes (int4: the code; mxfp4:
//   2·E2M1 + 12 from a vpshufb table), exact int32 sums per chunk; 4-bit codes only.
// avx512_bf16: bf16 rows (rounded to nearest even on entry), vdpbf16ps, fp32 accumulation.
// avx512, avx2: fp32 rows, the weights widened to fp32 with the scale folded in, vfmadd.
enum class QuantPath : int { avx2 = 0, avx512 = 1, avx512_bf16 = 2, avx512_vnni = 3 };
enum class QuantRowsType : int { f32, bf16, s8 };
constexpr QuantRowsType quant_rows_type(QuantPath p) {
  return p == QuantPath::avx512_bf16 ? QuantRowsType::bf16
         : p == QuantPath::avx512_vnni ? QuantRowsType::s8
                                       : QuantRowsType::f32;
}

// The widest path of the bf16 / fp32 family the CPU allows (common/cpu.hpp: cpu().level,
// capped by MOE_MAX_ISA): avx512_bf16, avx512 or avx2. Prefill widens with it; on an AMX CPU
// its panels go to gemm_bf16_packed_serial, which picks its own engine.
QuantPath quant_best_path();
// The decode path for a matrix, by measurement (docs/quant.md): avx512_vnni for 4-bit codes
// where the CPU has AVX512-VNNI (and MOE_MAX_ISA allows avx512), else quant_best_path().
QuantPath quant_decode_path(QuantFormatId format);
// The prefill path for a matrix, by measurement (docs/quant.md, "Prefill"): avx512_vnni (int8
// rows, int8 panels, vpdpbusd) for 4-bit codes where the CPU has AVX512-VNNI and the level is
// below amx; else quant_best_path(), whose bf16 panels go to gemm_bf16_packed_serial (AMX tiles
// on an AMX CPU).
QuantPath quant_prefill_path(QuantFormatId format);
// Whether this CPU (and MOE_MAX_ISA) allows the path: the tests run each allowed one.
bool quant_path_allowed(QuantPath p);
// Whether the path reads the format (avx512_vnni: 4-bit codes only).
bool quant_path_supports(QuantPath p, QuantFormatId format);
const char* quant_path_name(QuantPath p);
// Whether the path's rows are bf16.
constexpr bool quant_rows_bf16(QuantPath p) { return quant_rows_type(p) == QuantRowsType::bf16; }

}  // namespace moe::detail
