// MoEConfig from JSON (a checkpoint's __metadata__["moe_config"]): any text must give a
// validated config that round-trips, or a moe::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "moe/checkpoint.hpp"
#include "moe/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int once = moe::fuzz::init_once();
  (void)once;
  moe::MoEConfig cfg;
  try {
    cfg = moe::config_from_json(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const moe::Error&) {
    return 0;
  }
  // Accepted: it is valid, and writing it out and reading it back gives the same text.
  cfg.validate();
  const std::string once_more = moe::config_to_json(cfg);
  if (moe::config_to_json(moe::config_from_json(once_more)) != once_more) __builtin_trap();
  return 0;
}
