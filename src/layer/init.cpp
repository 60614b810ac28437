#include "layer/init.hpp"

#include <cmath>

#include "common/check.hpp"
#include "common/philox.hpp"
#include "layer/shared_experts.hpp"

namespace moe::detail {

std::vector<ParamSpec> parameter_specs(const MoEConfig& cfg) {
  const int64_t d = cfg.d_model, E = cfg.n_experts, F = cfg.hidden(), Do = cfg.out_dim();
  std::vector<ParamSpec> s;
  s.push_back({"W_g", {d, E}});
  if (cfg.router_bias) s.push_back({"b_g", {E}});
  if (cfg.noise == Noise::learned) s.push_back({"W_noise", {d, E}});
  switch (cfg.expert) {
    case ExpertKind::linear_relu:
      s.push_back({"W1", {E, d, Do}});
      if (cfg.expert_bias) s.push_back({"b1", {E, Do}});
      break;
    case ExpertKind::mlp:
      s.push_back({"W1", {E, d, F}});
      if (cfg.expert_bias) s.push_back({"b1", {E, F}});
      s.push_back({"W2", {E, F, Do}});
      if (cfg.expert_bias) s.push_back({"b2", {E, Do}});
      break;
    case ExpertKind::swiglu:
      s.push_back({"W1", {E, d, F}});
      s.push_back({"W2", {E, F, Do}});
      s.push_back({"W3", {E, d, F}});
      break;
    case ExpertKind::clamped_swiglu:
      s.push_back({"W1", {E, d, F}});
      if (cfg.expert_bias) s.push_back({"b1", {E, F}});
      s.push_back({"W2", {E, F, Do}});
      if (cfg.expert_bias) s.push_back({"b2", {E, Do}});
      s.push_back({"W3", {E, d, F}});
      if (cfg.expert_bias) s.push_back({"b3", {E, F}});
      break;
  }
  shared_parameter_specs(s, cfg);  // Ws1, ... when n_shared_experts > 0
  return s;
}

namespace {

// Fills p with scale·N(0, 1), element i from Philox counter (i/4, stream).
void fill_normal(Tensor& p, double scale, uint64_t seed, uint32_t stream) {
  constexpr uint64_t kSalt = 0x5DEECE66D2545F49ull;  // keeps init apart from routing noise
  float z[4];
  const int64_t n = p.numel();
  for (int64_t i = 0; i < n; i += 4) {
    philox_normal4(z, seed ^ kSalt, stream, i / 4, 0);
    for (int64_t j = 0; j < 4 && i + j < n; ++j)
      p.data[i + j] = static_cast<float>(scale * static_cast<double>(z[j]));
  }
}

}  // namespace

void init_parameters(std::vector<Tensor>& params, const std::vector<std::string>& names,
                     const MoEConfig& cfg) {
  const double d = static_cast<double>(cfg.d_model), F = static_cast<double>(cfg.hidden());
  for (size_t i = 0; i < names.size(); ++i) {
    Tensor& p = params[i];
    const std::string& n = names[i];
    std::fill(p.data.begin(), p.data.end(), 0.0f);
    if (n == "W_g" || n == "W_noise") {
      if (cfg.router_init_std > 0.0f)
        fill_normal(p, cfg.router_init_std, cfg.seed, n == "W_g" ? 1 : 2);
    } else if (n == "W1") {
      fill_normal(p, 1.0 / std::sqrt(d), cfg.seed, 3);
    } else if (n == "W2") {
      fill_normal(p, 1.0 / std::sqrt(cfg.expert == ExpertKind::linear_relu ? d : F), cfg.seed, 4);
    } else if (n == "W3") {
      fill_normal(p, 1.0 / std::sqrt(d), cfg.seed, 5);
    } else {
      init_shared_parameter(p, n, cfg);
    }
  }
}

}  // namespace moe::detail
