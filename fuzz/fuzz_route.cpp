// `moe route`'s JSON input: any bytes must give either a routing document or a moe::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "fuzz_common.hpp"
#include "moe/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int once = moe::fuzz::init_once();
  (void)once;
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::string out;
  try {
    out = moe::cli::run_route_json(text);
  } catch (const moe::Error&) {
    return 0;  // rejected with a message: the contract
  }
  // Accepted: the output carries the three fields.
  const auto doc = nlohmann::json::parse(out);
  if (!doc.is_object() || !doc.contains("gates") || !doc.contains("indices") ||
      !doc.contains("weights"))
    __builtin_trap();
  return 0;
}
