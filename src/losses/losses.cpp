// Public entry points of the auxiliary losses (SPEC §2); the math is in losses.hpp.
#include "losses/losses.hpp"

#include <cmath>

#include "common/check.hpp"
#include "moe/layer.hpp"

namespace moe {

double load_balancing_loss(float* dprobs, const int32_t* indices, const float* probs, int64_t T,
                           int64_t k, int64_t E, double alpha, bool normalize_by_k) {
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(E >= 1, "n_experts: must be at least 1, got ", E);
  MOE_REQUIRE(k >= 1 && k <= E, "k: must be in 1..", E, " (n_experts), got ", k);
  MOE_REQUIRE(std::isfinite(alpha), "alpha: must be finite, got ", alpha);
  MOE_REQUIRE(T == 0 || (indices && probs), "indices/probs: missing");
  for (int64_t a = 0; a < T * k; ++a)
    MOE_REQUIRE(indices[a] >= 0 && indices[a] < E, "indices: expert ", indices[a],
                " out of range 0..", E - 1, " at token ", a / k);
  return detail::load_balancing_loss_t(dprobs, indices, probs, T, k, E, alpha, normalize_by_k);
}

double router_z_loss(float* dlogits, const float* logits, int64_t T, int64_t E, double c_z) {
  MOE_REQUIRE(T >= 0, "T: must be >= 0, got ", T);
  MOE_REQUIRE(E >= 1, "n_experts: must be at least 1, got ", E);
  MOE_REQUIRE(std::isfinite(c_z), "c_z: must be finite, got ", c_z);
  MOE_REQUIRE(T == 0 || logits, "logits: missing");
  return detail::router_z_loss_t(dlogits, logits, T, E, c_z);
}

}  // namespace moe
