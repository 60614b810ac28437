#include "layer/workspace.hpp"

#include "common/check.hpp"
#include "router/expert_choice.hpp"

namespace moe::detail {

namespace {

// Carves b out of base (or only counts when base is null); returns the floats used. Each
// buffer starts on a 64-byte boundary relative to base.
int64_t carve_into(LayerBuffers& b, float* base, const MoEConfig& cfg, int64_t T) {
  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k, F = cfg.hidden(),
                Do = cfg.out_dim();
  // Rows: T·k assignments, or under expert choice E·C (each expert's C tokens).
  const int64_t R = cfg.router_kind == RouterKind::expert_choice
                        ? E * expert_choice_capacity(cfg, T)
                        : T * k;
  const bool hidden = cfg.expert != ExpertKind::linear_relu;
  const bool swiglu = cfg.expert == ExpertKind::swiglu || cfg.expert == ExpertKind::clamped_swiglu;
  int64_t used = 0;
  auto take = [&](float*& p, int64_t n) {
    p = base && n > 0 ? base + used : nullptr;
    used += (n + 15) / 16 * 16;
  };
  take(b.x, T * d);
  take(b.xg, R * d);
  take(b.a1, hidden ? R * F : 0);
  take(b.a3, swiglu ? R * F : 0);
  take(b.hid, hidden ? R * F : 0);
  take(b.out, R * Do);
  take(b.dout, R * Do);
  take(b.dh, hidden ? R * F : 0);
  take(b.da3, swiglu ? R * F : 0);
  take(b.dxg, R * d);
  take(b.dweights, T * k);
  take(b.dprobs, T * E);
  take(b.dlogits, T * E);
  return used;
}

}  // namespace

int64_t layer_workspace_floats(const MoEConfig& cfg, int64_t T) {
  LayerBuffers b;
  return carve_into(b, nullptr, cfg, T);
}

void LayerWorkspace::reserve(const MoEConfig& cfg, int64_t T) {
  const int64_t n = layer_workspace_floats(cfg, T);
  if (n > size_floats()) buf_.resize(static_cast<size_t>(n));
}

LayerBuffers LayerWorkspace::carve(const MoEConfig& cfg, int64_t T) {
  LayerBuffers b;
  const int64_t n = carve_into(b, buf_.data(), cfg, T);
  MOE_ASSERT(n <= size_floats());
  return b;
}

}  // namespace moe::detail
