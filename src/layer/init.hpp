// The layer's parameters: names and shapes in the fixed order of MoELayer::parameter_names,
// and their deterministic initialisation from cfg.seed (docs/math.md §init).
#pragma once
#include <string>
#include <vector>

#include "moe/layer.hpp"

namespace moe::detail {

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// W_g (d,E); b_g (E) if router_bias; W_noise (d,E) if learned noise; then the experts:
// linear_relu W1 (E,d,Do), b1 (E,Do)?; mlp W1 (E,d,F), b1 (E,F)?, W2 (E,F,Do), b2 (E,Do)?;
// swiglu W1 (E,d,F), W2 (E,F,Do), W3 (E,d,F); clamped_swiglu W1, b1? (E,F), W2, b2? (E,Do),
// W3, b3? (E,F).
std::vector<ParamSpec> parameter_specs(const MoEConfig& cfg);

// Experts: N(0, 1/fan_in) (LeCun normal; fan_in = the weight's input width). Router weights:
// N(0, router_init_std²), or zero when router_init_std is 0. Biases: zero. ε comes from
// Philox keyed by the seed (salted) with one stream per parameter, so it does not depend on
// the platform's <random> or on the thread count.
void init_parameters(std::vector<Tensor>& params, const std::vector<std::string>& names,
                     const MoEConfig& cfg);

}  // namespace moe::detail
