// The pretrained loader's readers (src/io/pretrained*.cpp, safetensors_header.hpp): the first
// byte picks one, the rest is its input. Any bytes must give either a consistent result or a
// moe::Error.
//   0: a safetensors header over every dtype of the format (what the loader maps);
//   1: model.safetensors.index.json (weight_map, file names inside the folder);
//   2: config.json through the family table to a valid MoEConfig (quantization_config
//      included: quant_method, bits, group sizes, GPTQ / AWQ keys, dynamic patterns);
//   3: one GPTQ or AWQ matrix (shape, group, qweight, qzeros, scales, g_idx from the bytes)
//      through the loader's repacking: refused with moe::Error, or held to the published
//      definition bit for bit.
//   4: config.json, a NUL byte, quantize_config.json (AutoGPTQ's settings file: used when
//      config.json has no quantization_config, else held to agree with it) to a valid MoEConfig.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "io/pretrained_folder.hpp"
#include "io/safetensors_header.hpp"
#include "moe/error.hpp"
#include "quant/int4_import.hpp"
#include "quant/quant_matrix.hpp"

namespace {

// Case 3: the first bytes choose the shape and the group, the rest fill the arrays (zeros
// past the end of the input).
void int4_matrix(const uint8_t* data, size_t size) {
  if (size < 4) return;
  const bool gptq = data[0] & 1, with_g_idx = data[0] & 2, v1 = data[0] & 4;
  const int64_t K = 8 * (1 + data[1] % 40), N = 8 * (1 + data[2] % 6);
  static constexpr int64_t kGroups[] = {32, 64, 128, 256, -1, 48, 8, 0};
  const int64_t group = kGroups[data[3] % 8];
  size_t at = 4;
  const auto next = [&]() -> uint8_t { return at < size ? data[at++] : 0; };
  const int64_t g = group == -1 ? K : group;
  const int64_t G = g > 0 ? (K + g - 1) / g : 1;
  std::vector<int32_t> qweight(static_cast<size_t>(gptq ? K / 8 * N : K * N / 8)),
      qzeros(static_cast<size_t>(G * N / 8)), g_idx(static_cast<size_t>(K));
  std::vector<uint16_t> scales(static_cast<size_t>(G * N));
  for (int32_t& w : qweight)
    for (int b = 0; b < 4; ++b) w = static_cast<int32_t>(static_cast<uint32_t>(w) << 8 | next());
  for (int32_t& w : qzeros) w = static_cast<int32_t>(next() * 0x01010101u);
  for (uint16_t& s : scales) {
    s = static_cast<uint16_t>(next() | next() << 8);
    if ((s & 0x7c00) == 0x7c00) s = 0x3c00;  // the loader does not check finiteness of fp16
  }
  for (int64_t k = 0; k < K; ++k)  // mostly valid groups, a byte may push one out of range
    g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(
        (k / std::max<int64_t>(g, 1) + (next() % 7 == 0 ? next() % 3 : 0)) % (G + 1));
  std::vector<double> want(static_cast<size_t>(K * N)), got(want.size());
  moe::detail::Int4Kernel::Weights w;
  if (gptq) {
    moe::detail::GptqInt4 t{K, N, group, qweight.data(), qzeros.data(), scales.data(),
                            with_g_idx ? g_idx.data() : nullptr, v1};
    w = moe::detail::int4_from_gptq(t);
    moe::detail::gptq_dequant_ref(t, want.data());
  } else {
    moe::detail::AwqInt4 t{K, N, group, qweight.data(), qzeros.data(), scales.data()};
    w = moe::detail::int4_from_awq(t);
    moe::detail::awq_dequant_ref(t, want.data());
  }
  moe::detail::quant_dequant_ref(w.view(), got.data());
  for (size_t i = 0; i < want.size(); ++i)
    if (std::memcmp(&want[i], &got[i], sizeof(double)) != 0 &&
        !(std::isnan(want[i]) && std::isnan(got[i])))
      __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int once = moe::fuzz::init_once();
  (void)once;
  if (size == 0) return 0;
  const int which = data[0] % 5;
  ++data;
  --size;
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    switch (which) {
      case 0: {
        const auto h = moe::detail::parse_safetensors_header(data, size, "fuzz");
        // Accepted: every tensor lies inside the data section with the bytes its shape needs.
        if (h.data_start + h.data_size != size) __builtin_trap();
        for (const auto& e : h.entries) {
          const size_t item = moe::detail::safetensors_dtype_size(e.dtype);
          if (item == 0 || e.end > h.data_size || e.begin > e.end) __builtin_trap();
          if (e.numel * item != e.end - e.begin) __builtin_trap();
        }
        break;
      }
      case 1: {
        const auto m = moe::detail::parse_index_json(text, "fuzz");
        // Accepted: every file name stays inside the folder (no absolute path, no "." or
        // ".." component, no empty one).
        for (const auto& [name, file] : m) {
          if (file.empty() || file[0] == '/') __builtin_trap();
          size_t start = 0;
          while (start <= file.size()) {
            const size_t end = std::min(file.find('/', start), file.size());
            const std::string part = file.substr(start, end - start);
            if (part.empty() || part == "." || part == "..") __builtin_trap();
            start = end + 1;
          }
        }
        break;
      }
      case 3:
        int4_matrix(data, size);
        break;
      case 4: {
        const size_t nul = text.find('\0');
        if (nul == std::string::npos) break;
        const moe::MoEConfig c = moe::detail::pretrained_config_from_json(
            text.substr(0, nul), "fuzz", text.substr(nul + 1), "fuzz quantize_config.json");
        c.validate();
        break;
      }
      default: {
        const moe::MoEConfig c = moe::detail::pretrained_config_from_json(text, "fuzz");
        c.validate();  // what the loader builds is a valid layer
        break;
      }
    }
  } catch (const moe::Error&) {
  }
  return 0;
}
