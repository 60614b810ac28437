// The safetensors / checkpoint loader (src/io/): any bytes must give either a file whose
// tensors are consistent, or a moe::Error. Truncations, header lengths past the end, offsets
// out of range or overlapping, bad dtypes and shapes, non-UTF-8 and deep JSON included.
#include <cstddef>
#include <cstdint>

#include "fuzz_common.hpp"
#include "moe/checkpoint.hpp"
#include "moe/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int once = moe::fuzz::init_once();
  (void)once;
  moe::SafetensorsFile f;
  try {
    f = moe::parse_safetensors(data, size, "fuzz");
  } catch (const moe::Error&) {
    return 0;
  }
  // Accepted: every tensor's values match its shape, and the data came from the input.
  size_t total = 0;
  for (const auto& t : f.tensors) {
    if (t.tensor.numel() != moe::Tensor::numel_of(t.tensor.shape)) __builtin_trap();
    total += static_cast<size_t>(t.tensor.numel());
    if (f.find(t.name) == nullptr) __builtin_trap();
  }
  // Every value takes at least 2 bytes of the file (F16/BF16), after the 8-byte length.
  if (size < 8 || total > (size - 8) / 2) __builtin_trap();
  // A checkpoint's config goes through the same door as read_checkpoint_config.
  auto it = f.metadata.find("moe_config");
  if (it != f.metadata.end()) {
    try {
      (void)moe::config_from_json(it->second);
    } catch (const moe::Error&) {
    }
  }
  return 0;
}
