// The pretrained loader's readers (src/io/pretrained*.cpp, safetensors_header.hpp): the first
// byte picks one, the rest is its input. Any bytes must give either a consistent result or a
// moe::Error.
//   0: a safetensors header over every dtype of the format (what the loader maps);
//   1: model.safetensors.index.json (weight_map, file names inside the folder);
//   2: config.json through the family table to a valid MoEConfig.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "io/pretrained_folder.hpp"
#include "io/safetensors_header.hpp"
#include "moe/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int once = moe::fuzz::init_once();
  (void)once;
  if (size == 0) return 0;
  const int which = data[0] % 3;
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
        for (const auto& [name, file] : m)
          if (file.empty() || file[0] == '/' || file.find("..") == 0) __builtin_trap();
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
