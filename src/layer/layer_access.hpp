// What the library's own loaders and writers reach inside a MoELayer beyond its public
// interface: the expert matrices in a low-bit format as stored bytes (a checkpoint's tensors
// copied in as they are, and read out to be saved as they are held). Not installed.
#pragma once
#include <cstdint>
#include <string>

#include "experts/precision.hpp"
#include "moe/layer.hpp"
#include "quant/quant_matrix.hpp"

namespace moe::detail {

struct LayerAccess {
  // Expert e's matrix `name` (W1, W2, W3, Ws1, Ws2, Ws3) of a low-bit layer from stored bytes
  // in the layer's format, copied as they are (no wider copy). moe::Error on an unknown name,
  // e out of range, another format or another shape. Without masters these are the weights;
  // with masters they are the copies the next forward uses only if stored_copies_current()
  // follows once every matrix is set (and the masters do not change after it).
  static void set_expert_matrix_stored(MoELayer& L, const std::string& name, int64_t e,
                                       const QuantMatrix& v);
  // A low-bit layer with masters whose copies were all set from stored bytes that the
  // masters' values equal (a checkpoint's): the copies are current, not made again.
  static void stored_copies_current(MoELayer& L);
  // The stored form of expert e's matrix `name` of a low-bit layer without masters (a view
  // valid while the layer is unchanged).
  static const QuantMatrix& expert_matrix_stored(const MoELayer& L, const std::string& name,
                                                 int64_t e);
};

}  // namespace moe::detail
