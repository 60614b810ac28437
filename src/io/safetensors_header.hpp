// The header of a safetensors file on its own: the checks of load_safetensors (sizes against
// the file before anything is allocated, depth-limited JSON, duplicate keys, overflow-checked
// offsets, no overlapping tensors), over every dtype of the format. The pretrained loader
// (src/io/pretrained*.cpp) reads the tensors itself from a read-only mapping of the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::detail {

struct StEntry {
  std::string name;
  std::string dtype;             // "F32", "BF16", "F8_E4M3", "U8", ...
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t begin = 0, end = 0;   // relative to the start of the data section, checked
};

struct StHeader {
  std::vector<StEntry> entries;                 // in header order
  std::map<std::string, std::string> metadata;  // "__metadata__"
  uint64_t data_start = 0;                      // 8 + header length
  uint64_t data_size = 0;                       // bytes after the header
};

// bytes is the whole file (size bytes). Throws moe::Error naming `what` and the problem; a
// dtype outside the format's list is an error naming the tensor.
StHeader parse_safetensors_header(const uint8_t* bytes, size_t size, const std::string& what);

// JSON text checked as a safetensors header is (valid UTF-8, no NUL, nested at most
// kSafetensorsMaxJsonDepth deep, no key twice in one object) and parsed. Errors read
// "<what>: <part> is not valid JSON (...)".
nlohmann::ordered_json parse_json_checked(const std::string& text, const std::string& what,
                                          const char* part);

// IEEE half → float, exactly (subnormals included).
float f16_to_float(uint16_t h);

// Bytes per element of a dtype of the format, 0 when unknown.
size_t safetensors_dtype_size(const std::string& dtype);

}  // namespace moe::detail
