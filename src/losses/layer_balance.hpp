// The fast layer's side of the balancing losses (losses/balancing.hpp): the state the
// "global" kind keeps between forwards, and the glue from the router's saved state.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/check.hpp"
#include "losses/balancing.hpp"
#include "moe/layer.hpp"
#include "moe/router.hpp"

namespace moe::detail {

struct BalanceState {
  std::vector<int64_t> global_load;  // (E) hard selections since the last reset (training)
  int64_t global_tokens = 0;         // tokens of those forwards
  std::vector<double> f;             // (E) global f of the last forward
  bool use_global_f = false;         // the last forward used f (else the batch's own)
  bool noisy = false;                // the last forward applied noise
  std::vector<float> dpre;           // (T, E) scratch of backward (shazeer, learned noise)
  std::vector<float> xj, dxj;        // (T, d) scratch: the jittered router input and its grad

  void reset_global() {
    std::fill(global_load.begin(), global_load.end(), 0);
    global_tokens = 0;
  }
};

// Checks the batch against the loss (seq needs seq_len | T), before anything is computed.
inline void balance_check_batch(const MoEConfig& cfg, int64_t T) {
  if (cfg.aux_loss_kind == AuxLossKind::seq && cfg.seq_len > 0)
    MOE_REQUIRE(T % cfg.seq_len == 0, "seq_len: aux_loss 'seq' needs T a multiple of seq_len (",
                cfg.seq_len, "), got T = ", T);
}

inline BalanceInputs<float> balance_inputs(const RouterState& r, const BalanceState& bs) {
  BalanceInputs<float> in;
  in.T = r.T;
  in.k = r.k;
  in.E = r.E;
  in.indices = r.indices.data();
  in.weights = r.weights.data();
  in.probs = r.probs.data();
  in.h = r.logits.data();
  in.H = r.H();
  in.noisy = bs.noisy;
  in.eps = bs.noisy ? r.eps.data() : nullptr;
  in.pre = bs.noisy && !r.noise_pre.empty() ? r.noise_pre.data() : nullptr;
  in.global_f = bs.use_global_f ? bs.f.data() : nullptr;
  return in;
}

// Forward: updates the global loads (training forwards of kind global) and returns the loss.
// load_before (E) holds the batch's hard top-k selections per expert.
inline double balance_forward(BalanceState& bs, const RouterState& r, const MoEConfig& cfg,
                              const std::vector<int64_t>& load_before, bool training) {
  const int64_t E = cfg.n_experts;
  bs.noisy = training && cfg.noise != Noise::none;
  bs.use_global_f = false;
  if (cfg.aux_loss_kind == AuxLossKind::global && training && r.T > 0) {
    bs.global_load.resize(static_cast<size_t>(E), 0);
    for (int64_t e = 0; e < E; ++e) bs.global_load[e] += load_before[e];
    bs.global_tokens += r.T;
    const double s = 1.0 / (static_cast<double>(bs.global_tokens) *
                            (cfg.normalize_by_k ? static_cast<double>(cfg.k) : 1.0));
    bs.f.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) bs.f[e] = static_cast<double>(bs.global_load[e]) * s;
    bs.use_global_f = true;
  }
  return balancing_loss<float>(BalanceGrads<float>{}, balance_inputs(r, bs),
                               BalanceSpec::of(cfg));
}

}  // namespace moe::detail
