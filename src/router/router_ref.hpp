// The reference router (STYLE.md item 2): obvious loops on any scalar type, the oracle of the
// fast router's tests and, instantiated on double, of the gradient checks. Only ε is shared
// with the fast path (common/philox.hpp), so that both route the same noisy logits.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/philox.hpp"
#include "common/row_math.hpp"
#include "moe/router.hpp"
#include "common/bf16.hpp"
#include "router/scores.hpp"

namespace moe::detail {

// Validation shared by every router entry point; throws moe::Error naming the argument.
void check_router_call(const RouterConfig& cfg, int64_t T, bool training, const void* x,
                       const void* W_g, const void* b_g, const void* W_noise,
                       const NoiseSource& noise);

// "what: non-finite value at token G" with G = token_offset + t, the global index.
[[noreturn]] void throw_non_finite(const char* what, int64_t t, const NoiseSource& noise);

template <typename S>
struct RouterRefParams {
  const S* W_g = nullptr;      // (d, E)
  const S* b_g = nullptr;      // (E) or null
  const S* W_noise = nullptr;  // (d, E), learned noise
  const float* sel_bias = nullptr;  // (E) selection bias, or null
};

// The reference's outputs, as RouterState holds them but in S.
template <typename S>
struct RouterRefOut {
  std::vector<int32_t> indices;           // (T, k), best first
  std::vector<S> weights;                 // (T, k)
  std::vector<S> logits, noisy, probs;    // (T, E)
  std::vector<S> eps, noise_pre;          // (T, E) when noise was applied / learned
  std::vector<S> scores;                  // (T, E) sigmoid(H), router sigmoid only
  std::vector<float> jitter;              // (T, d) router-input factors, jitter in training
};

// x is (T, d). Throws moe::Error exactly where router_forward does.
template <typename S>
void router_forward_ref_t(RouterRefOut<S>& o, const S* x, const RouterRefParams<S>& p,
                          const RouterConfig& cfg, int64_t T, bool training,
                          const NoiseSource& noise) {
  check_router_call(cfg, T, training, x, p.W_g, p.b_g, p.W_noise, noise);
  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k;
  const bool noisy = training && cfg.noise != Noise::none;
  const bool learned = noisy && cfg.noise == Noise::learned;
  const bool high = cfg.tie_break == TieBreak::high;
  const size_t TE = static_cast<size_t>(T * E);
  o.indices.assign(static_cast<size_t>(T * k), 0);
  o.weights.assign(static_cast<size_t>(T * k), S(0));
  o.logits.assign(TE, S(0));
  o.noisy.assign(TE, S(0));
  o.probs.assign(TE, S(0));
  o.eps.assign(noisy ? TE : 0, S(0));
  o.noise_pre.assign(learned ? TE : 0, S(0));
  const bool sig = cfg.kind == RouterKind::sigmoid;
  const bool jit = training && cfg.jitter > 0.0f;
  o.scores.assign(sig ? TE : 0, S(0));
  o.jitter.assign(jit ? static_cast<size_t>(T * d) : 0, 1.0f);
  std::vector<float> drawn(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  std::vector<S> xj(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < d; ++i)
      if (!std::isfinite(x[t * d + i])) throw_non_finite("x", t, noise);
    // The router's input: x, or x·u with the jitter factors u (training).
    const S* xt = x + t * d;
    if (jit) {
      float* u = &o.jitter[t * d];
      jitter_row(u, d, cfg.jitter, noise.seed, noise.step, noise.token_offset + t);
      for (int64_t i = 0; i < d; ++i) xj[i] = xt[i] * static_cast<S>(u[i]);
      xt = xj.data();
    }
    S* h = &o.logits[t * E];
    S* H = &o.noisy[t * E];
    for (int64_t e = 0; e < E; ++e) {
      S acc = cfg.use_bias ? p.b_g[e] : S(0);
      for (int64_t i = 0; i < d; ++i) acc += xt[i] * p.W_g[i * E + e];
      h[e] = cfg.round_logits ? S(round_bf16(static_cast<float>(acc))) : acc;
      if (!std::isfinite(acc)) throw_non_finite("router logits h", t, noise);
    }
    if (noisy) {
      S* eps = &o.eps[t * E];
      if (noise.eps) {
        for (int64_t e = 0; e < E; ++e) {
          eps[e] = noise.eps[t * E + e];
          if (!std::isfinite(eps[e])) throw_non_finite("noise eps", t, noise);
        }
      } else {
        philox_normal_rows(drawn.data(), E, 1, E, noise.seed, noise.step, noise.token_offset + t);
        for (int64_t e = 0; e < E; ++e) eps[e] = drawn[e];
      }
      for (int64_t e = 0; e < E; ++e) {
        S scale = static_cast<S>(cfg.noise_stddev);
        if (learned) {
          S pre = 0;
          for (int64_t i = 0; i < d; ++i) pre += xt[i] * p.W_noise[i * E + e];
          o.noise_pre[t * E + e] = pre;
          scale = cfg.noise_scale == NoiseScale::softplus ? softplus(pre) : pre;
        }
        H[e] = h[e] + scale * eps[e];
        if (!std::isfinite(H[e])) throw_non_finite("noisy logits H", t, noise);
      }
    } else {
      std::copy(h, h + E, H);
    }
    if (!router_scores_default(cfg, p.sel_bias)) {
      route_row_ref<S>(&o.indices[t * k], &o.weights[t * k], &o.probs[t * E],
                       sig ? &o.scores[t * E] : nullptr, H, p.sel_bias, cfg);
      continue;
    }
    // KeepTopK by a full sort of the expert indices by rank.
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return outranks(H[a], a, H[b], b, high); });
    const S top = H[order[0]];
    S kept_sum = 0;
    for (int64_t j = 0; j < k; ++j) kept_sum += std::exp(H[order[j]] - top);
    for (int64_t j = 0; j < k; ++j) {
      o.indices[t * k + j] = order[j];
      o.weights[t * k + j] = std::exp(H[order[j]] - top) / kept_sum;
      if (cfg.scaling_factor != 1.0f) o.weights[t * k + j] *= static_cast<S>(cfg.scaling_factor);
    }
    S all_sum = 0;
    for (int64_t e = 0; e < E; ++e) all_sum += std::exp(H[e] - top);
    for (int64_t e = 0; e < E; ++e) o.probs[t * E + e] = std::exp(H[e] - top) / all_sum;
  }
}

}  // namespace moe::detail
