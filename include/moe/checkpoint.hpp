// Checkpoints in the safetensors format (docs/checkpoints.md): an 8-byte little-endian header
// length N, N bytes of JSON header (padded with spaces to a multiple of 8), then the raw
// little-endian tensor data. Other tools (numpy, the `safetensors` package) read our files.
//
// Saving is atomic: the bytes go to `<path>.tmp.<pid>` in the same folder, are fsync'ed and
// renamed over `path`; on failure the temporary is removed and an existing file is left as it
// was. Loading validates every byte of the header against the data before it allocates, and
// throws moe::Error naming the file and the problem; hostile input never crashes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/tensor.hpp"

namespace moe {

class Optimizer;

// One tensor read from a file. `dtype` is the file's dtype string ("F32", "F64", "F16",
// "BF16", "I8" or "U8"); the values are converted to float32 in `tensor` (exactly, for I8
// and U8).
struct NamedTensor {
  std::string name;
  std::string dtype;
  Tensor tensor;
};

struct SafetensorsFile {
  std::vector<NamedTensor> tensors;              // in header order
  std::map<std::string, std::string> metadata;   // the header's "__metadata__"

  const NamedTensor* find(const std::string& name) const;  // nullptr when absent
};

// Writes tensors (as F32, in the given order, data contiguous) and metadata to `path`
// atomically; the tensors named in `as_i8` are written as I8 (int8 weights, precision int8),
// and every value of theirs must be an integer in [-128, 127]; those in `as_u8` as U8 (the
// codes and E8M0 scales of the low-bit precisions), integers in [0, 255]. Throws moe::Error on a null
// tensor, a shape that does not match the data, a duplicate or reserved name
// ("__metadata__"), a value I8 cannot hold, non-UTF-8 text, or any I/O failure.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                      const std::map<std::string, std::string>& metadata = {},
                      const std::set<std::string>& as_i8 = {},
                      const std::set<std::string>& as_u8 = {});

// Reads and validates a whole file. Throws moe::Error naming `path` and the problem.
SafetensorsFile load_safetensors(const std::string& path);

// The same checks on bytes in memory (what load_safetensors does after reading; the fuzzer's
// entry point). `what` names the source in error messages.
SafetensorsFile parse_safetensors(const uint8_t* bytes, size_t size,
                                  const std::string& what = "<memory>");

// Hard limits of the loader, so that a hostile header cannot ask for unbounded work.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100ull << 20;  // 100 MiB
inline constexpr int kSafetensorsMaxJsonDepth = 64;

// ---- Layer checkpoints ---------------------------------------------------------------------

// What a checkpoint may carry besides the layer: free-form metadata, other tensors (e.g. a
// linear head, "head.W"), and an optimizer's state (tensors "optim.<slot>.<param>" plus
// __metadata__["optim"]).
struct CheckpointExtras {
  CheckpointExtras() = default;  // not an aggregate: save_checkpoint(l, p, {{"k", "v"}}) is the map
  std::map<std::string, std::string> metadata;
  std::vector<std::pair<std::string, const Tensor*>> tensors;
  const Optimizer* optimizer = nullptr;
};

// Stores every parameter of the layer under its own name (MoELayer::parameter_names()), and
// the layer's config as JSON in __metadata__["moe_config"].
void save_checkpoint(const MoELayer& layer, const std::string& path,
                     const std::map<std::string, std::string>& metadata = {});
void save_checkpoint(const MoELayer& layer, const std::string& path,
                     const CheckpointExtras& extras);

// Loads the layer's parameters. Every parameter must be present as F32 with the layer's
// shape, else moe::Error names the tensor, the expected and the found shape or dtype; the
// layer is changed only when the whole file checks out. When `optimizer` is non-null its
// state is restored from the same file (see Optimizer::load_state). Returns the whole file,
// so that the caller can pick up its own extra tensors and metadata.
SafetensorsFile load_checkpoint(MoELayer& layer, const std::string& path,
                                Optimizer* optimizer = nullptr);

// The config stored in a checkpoint (from __metadata__["moe_config"]), e.g. to build the
// layer before loading into it.
MoEConfig read_checkpoint_config(const std::string& path);

// ---- MoEConfig as JSON ---------------------------------------------------------------------

// One JSON object with every field of MoEConfig, enums as their strings, capacity_factor
// null when dropless.
std::string config_to_json(const MoEConfig& cfg);
// The inverse. Missing fields keep their defaults; an unknown field, a wrong type or an
// invalid value throws moe::Error naming the field. The result is validated.
MoEConfig config_from_json(const std::string& json);

}  // namespace moe
