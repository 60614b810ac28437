// One forward of a small MoE layer through the installed library: the worked example of
// docs/spec.md (two inputs, three linear+ReLU experts, top-2, no noise). Prints the gates,
// the output and the loads, then checks them against the values worked out by hand.
#include <cmath>
#include <cstdio>
#include <vector>

#include "moe/moe.hpp"

int main() {
  moe::MoEConfig cfg;
  cfg.d_model = 2;
  cfg.n_experts = 3;
  cfg.k = 2;
  cfg.expert = moe::ExpertKind::linear_relu;
  cfg.noise = moe::Noise::none;
  moe::MoELayer layer(cfg);
  layer.param("W_g").data = {1, 0, -1, 0, 1, 1};                 // (d, E)
  layer.param("W1").data = {1, 0, 0, 1, 0, 1, 1, 0, 5, 5, 5, 5};  // (E, d, d_out)
  layer.param("b1").data = {0, 0, 0, 0, 0, 0};                    // (E, d_out)

  const std::vector<float> x = {0.8f, 0.6f};
  std::vector<float> y(2);
  moe::ForwardOptions opt;
  opt.training = false;
  layer.forward(y.data(), x.data(), 1, opt);

  const moe::RouterState& r = layer.routing();
  const moe::MoEStats& s = layer.stats();
  std::printf("experts %d %d, weights %.3f %.3f\n", r.indices[0], r.indices[1], r.weights[0],
              r.weights[1]);
  std::printf("y %.3f %.3f\n", y[0], y[1]);
  std::printf("load %lld %lld %lld\n", static_cast<long long>(s.load_after[0]),
              static_cast<long long>(s.load_after[1]), static_cast<long long>(s.load_after[2]));
  // H = x·W_g = (0.8, 0.6, -0.2): experts 0 and 1, gates softmax(0.8, 0.6) = (0.550, 0.450);
  // y = 0.550·(0.8, 0.6) + 0.450·(0.6, 0.8) = (0.710, 0.690).
  const bool ok = r.indices[0] == 0 && r.indices[1] == 1 && std::fabs(y[0] - 0.70997f) < 1e-4f &&
                  std::fabs(y[1] - 0.69003f) < 1e-4f;
  std::printf("%s\n", ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}
