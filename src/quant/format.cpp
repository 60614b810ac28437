#include "quant/format.hpp"

#include <cmath>
#include <cstring>

#include "common/check.hpp"
#include "common/cpu.hpp"

namespace moe::detail {

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // ≥ 65520 rounds to infinity
  if (u < 0x38800000u) {                         // below 2^-14: a multiple of 2^-24
    float a;
    std::memcpy(&a, &u, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // exact scaling
  }
  const uint32_t mant = u & 0x7fffffu, rem = mant & 0x1fffu;
  uint32_t h = (((u >> 23) - 112u) << 10) | (mant >> 13);
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

namespace {
std::array<float, 256> make_values(QuantFormatId id) {
  std::array<float, 256> v{};
  for (int c = 0; c < 256; ++c) {
    switch (id) {
      case QuantFormatId::int4: v[c] = c < 16 ? static_cast<float>(c) : 0.0f; break;
      case QuantFormatId::mxfp4: v[c] = c < 16 ? e2m1_value(c) : 0.0f; break;
      case QuantFormatId::fp8: v[c] = e4m3_value(c); break;
    }
  }
  return v;
}
}  // namespace

const std::array<float, 256>& quant_code_values(QuantFormatId id) {
  static const std::array<float, 256> tables[] = {make_values(QuantFormatId::int4),
                                                  make_values(QuantFormatId::mxfp4),
                                                  make_values(QuantFormatId::fp8)};
  return tables[static_cast<int>(id)];
}

float quant_scale_value(QuantScale s, const void* scales, int64_t index) {
  switch (s) {
    case QuantScale::f16: return f16_to_f32(static_cast<const uint16_t*>(scales)[index]);
    case QuantScale::e8m0: return e8m0_value(static_cast<const uint8_t*>(scales)[index]);
    case QuantScale::f32: return static_cast<const float*>(scales)[index];
  }
  return 0.0f;
}

QuantPath quant_best_path() {
  if (isa_at_least(Isa::avx512_bf16)) return QuantPath::avx512_bf16;
  if (isa_at_least(Isa::avx512)) return QuantPath::avx512;
  return QuantPath::avx2;
}

QuantPath quant_decode_path(QuantFormatId format) {
  if (quant_path_allowed(QuantPath::avx512_vnni) && quant_path_supports(QuantPath::avx512_vnni, format))
    return QuantPath::avx512_vnni;
  return quant_best_path();
}

QuantPath quant_prefill_path(QuantFormatId format) {
  return amx_kernels() ? quant_best_path() : quant_decode_path(format);
}

bool quant_path_allowed(QuantPath p) {
  switch (p) {
    case QuantPath::avx2: return true;
    case QuantPath::avx512: return isa_at_least(Isa::avx512);
    case QuantPath::avx512_bf16: return isa_at_least(Isa::avx512_bf16);
    case QuantPath::avx512_vnni: return vnni_kernels();
  }
  return false;
}

bool quant_path_supports(QuantPath p, QuantFormatId format) {
  return p != QuantPath::avx512_vnni || quant_format(format).code_bits == 4;
}

const char* quant_path_name(QuantPath p) {
  switch (p) {
    case QuantPath::avx2: return "avx2";
    case QuantPath::avx512: return "avx512";
    case QuantPath::avx512_bf16: return "avx512_bf16";
    case QuantPath::avx512_vnni: return "avx512_vnni";
  }
  return "?";
}

}  // namespace moe::detail
