// One workspace for the fast layer, carved in one place (STYLE.md item 5). It is sized for
// the largest T seen so far and reused: in steady state forward and backward allocate
// nothing. Rows R = T·k bound the kept assignments, so memory is O(T·k·(d + F + d_out)),
// never O(T·E·C).
#pragma once
#include <cstdint>
#include <vector>

#include "moe/layer.hpp"

namespace moe::detail {

struct LayerBuffers {
  // Saved by forward.
  float* x = nullptr;    // (T, d) copy of the input, for the router's backward
  float* xg = nullptr;   // (R, d) kept rows grouped by expert
  float* a1 = nullptr;   // (R, F) mlp, swiglu
  float* a3 = nullptr;   // (R, F) swiglu
  float* hid = nullptr;  // (R, F) mlp, swiglu
  float* out = nullptr;  // (R, Do)
  // Backward scratch.
  float* dout = nullptr;      // (R, Do)
  float* dh = nullptr;        // (R, F) mlp, swiglu
  float* da3 = nullptr;       // (R, F) swiglu
  float* dxg = nullptr;       // (R, d)
  float* dweights = nullptr;  // (T, k)
  float* dprobs = nullptr;    // (T, E)
  float* dlogits = nullptr;   // (T, E)
};

// Floats needed for a batch of T tokens (carve and this agree by construction).
int64_t layer_workspace_floats(const MoEConfig& cfg, int64_t T);

class LayerWorkspace {
 public:
  void reserve(const MoEConfig& cfg, int64_t T);  // grows, never shrinks
  LayerBuffers carve(const MoEConfig& cfg, int64_t T);
  int64_t size_floats() const { return static_cast<int64_t>(buf_.size()); }

 private:
  std::vector<float> buf_;
};

}  // namespace moe::detail
