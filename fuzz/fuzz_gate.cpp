// `moe gate`'s JSON input: any bytes must give either a gates document or a moe::Error.
#include <cstddef>
#include <cmath>
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
    out = moe::cli::run_gate_json(text);
  } catch (const moe::Error&) {
    return 0;  // rejected with a message: the contract
  }
  // Accepted: gates have the logits' shape, lie in [0, 1] and each row sums to 1.
  const auto in = nlohmann::json::parse(text);
  const auto doc = nlohmann::json::parse(out);
  if (!doc.is_object() || !doc.contains("gates")) __builtin_trap();
  const auto& logits = in["logits"];
  const auto& gates = doc["gates"];
  const bool flat = !logits[0].is_array();
  const auto rows = flat ? nlohmann::json::array({gates}) : gates;
  if (gates.size() != logits.size()) __builtin_trap();
  const bool rounded = in.contains("round") && !in["round"].is_null();
  for (const auto& row : rows) {
    double sum = 0.0;
    for (const auto& g : row) {
      const double v = g.get<double>();
      if (!(v >= 0.0 && v <= 1.0)) __builtin_trap();
      sum += v;
    }
    // Rounding to few decimals moves each entry by up to half a unit of the last place.
    const double tol = rounded ? 0.5 * static_cast<double>(row.size()) : 1e-4;
    if (std::fabs(sum - 1.0) > tol) __builtin_trap();
  }
  return 0;
}
