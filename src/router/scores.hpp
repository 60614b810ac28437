// The router family's score functions, selection bias, group-limited selection and jitter
// (docs/routing.md, "Score functions, selection bias, groups and jitter"; the backward is
// derived in docs/math.md). Per token, from the noisy logits H (E):
//
//   router        score s          gate weights of the kept experts        probs (balancing)
//   topk_softmax  H                softmax(H[kept])                        softmax(H)
//   softmax_topk  softmax(H)       s[kept]  (÷ Σ s[kept] with renormalize)  softmax(H)
//   sigmoid       sigmoid(H)       s[kept]  (÷ Σ s[kept] with renormalize)  s / Σ_e s_e
//
// then weights ×= scaling_factor. Selection ranks s + b, with b the selection bias
// (bias_update_rate > 0 or selection_bias; never part of the weights), among the experts of
// the best topk_groups groups when n_groups > 1 (a group scores the sum of its two best s + b,
// or with group_score max its best s + b).
// Ties go to the higher (or lower) index everywhere, as cfg.tie_break says; tie_break torch
// selects as torch.topk does (topk_torch below; n_groups 1 only).
//
// The reference twin here is templated on the scalar type (plain loops, full sorts); the
// fast float row (scores.cpp) is tested against it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/bf16.hpp"
#include "moe/router.hpp"

namespace moe::detail {

// a outranks b: larger value, ties to the higher (or lower) expert index.
template <typename S>
inline bool outranks(S va, int32_t ia, S vb, int32_t ib, bool tie_high) {
  if (va != vb) return va > vb;
  return tie_high ? ia > ib : ia < ib;
}

// The k largest of v (n values) in the order torch.topk(v, k) returns them on the CPU
// (largest, sorted): over (value, index) pairs laid out in index order, comparing values only,
// a partial sort of the first k when k·64 <= n, else a selection that puts the k-th in place
// and a sort of the k-1 before it — the algorithm of torch's CPU topk (ATen's TopKImpl.h),
// on the same libstdc++ algorithms, so that among equal values the same experts win, in the
// same order. (Values are finite here: the router refuses others before selecting.)
template <typename S>
void topk_torch(int32_t* idx, const S* v, int64_t n, int64_t k,
                std::vector<std::pair<S, int64_t>>& q) {
  q.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) q[static_cast<size_t>(j)] = {v[j], j};
  auto larger = [](const std::pair<S, int64_t>& a, const std::pair<S, int64_t>& b) {
    return a.first > b.first;
  };
  if (k * 64 <= n) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), larger);
  } else {
    std::nth_element(q.begin(), q.begin() + (k - 1), q.end(), larger);
    std::sort(q.begin(), q.begin() + (k - 1), larger);
  }
  for (int64_t j = 0; j < k; ++j) idx[j] = static_cast<int32_t>(q[static_cast<size_t>(j)].second);
}

// Added to Σ s[kept] before renormalising (as DeepSeek-V3 does): below float's ulp of any
// sum that matters, it only keeps a row whose kept scores all underflowed from dividing 0/0.
constexpr double kRenormEps = 1e-20;

// Routers whose per-token weights are the default's softmax over the kept H. expert_choice
// routes per expert in the layer (router/expert_choice.hpp) but runs this per-token router
// for its logits and probs, unchanged.
inline bool kept_softmax_kind(RouterKind k) {
  return k == RouterKind::topk_softmax || k == RouterKind::expert_choice;
}

// True when a token's routing is the default's KeepTopK(H) with the kept softmax, which the
// fast router runs with its own kernels; scaling_factor applies after either path.
inline bool router_scores_default(const RouterConfig& cfg, const float* sel_bias) {
  return kept_softmax_kind(cfg.kind) && cfg.n_groups == 1 && sel_bias == nullptr &&
         cfg.tie_break != TieBreak::torch && !cfg.round_weights;
}

template <typename S>
inline S sigmoid_score(S z) {
  return z >= S(0) ? S(1) / (S(1) + std::exp(-z)) : std::exp(z) / (S(1) + std::exp(z));
}

// Jitter factors U(1 - jitter, 1 + jitter) for the d inputs of one token into u (d): Philox
// keyed by the seed (salted), counter (0x80000000 + i/4, token, step), so the draws are
// distinct from ε's and independent of threads and batch split. Same bits in every caller.
void jitter_row(float* u, int64_t d, float jitter, uint64_t seed, uint64_t step,
                int64_t token);

// The fast float row (scores.cpp): the router-family path of route_token_f32. probs and
// scores are (E); scores is written for the sigmoid router only (may be null otherwise).
void route_scores_row_f32(int32_t* idx, float* w, float* probs, float* scores, const float* H,
                          const float* sel_bias, const RouterConfig& cfg);

// The reference of route_scores_row_f32, on any scalar type: obvious loops and full sorts.
template <typename S>
void route_row_ref(int32_t* idx, S* w, S* probs, S* scores, const S* H, const float* sel_bias,
                   const RouterConfig& cfg) {
  const int64_t E = cfg.n_experts, k = cfg.k, G = cfg.n_groups;
  const bool high = cfg.tie_break == TieBreak::high;
  std::vector<S> s(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
  S mx = H[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, H[e]);
  S sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += (probs[e] = std::exp(H[e] - mx));
  for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
  for (int64_t e = 0; e < E; ++e)
    s[e] = kept_softmax_kind(cfg.kind)            ? H[e]
           : cfg.kind == RouterKind::softmax_topk ? probs[e]
                                                  : sigmoid_score(H[e]);
  if (cfg.kind == RouterKind::sigmoid) {
    S ssum = 0;
    for (int64_t e = 0; e < E; ++e) ssum += s[e];
    for (int64_t e = 0; e < E; ++e) probs[e] = s[e] / ssum;
    if (scores) std::copy(s.begin(), s.end(), scores);
  }
  for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + (sel_bias ? S(sel_bias[e]) : S(0));
  auto before = [&](int32_t a, int32_t b) { return outranks(sel[a], a, sel[b], b, high); };

  std::vector<int32_t> order;
  if (G > 1) {
    const int64_t gs = E / G;
    std::vector<S> gscore(static_cast<size_t>(G), S(0));
    std::vector<int32_t> members(static_cast<size_t>(gs)), gorder(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      std::iota(members.begin(), members.end(), static_cast<int32_t>(g * gs));
      std::sort(members.begin(), members.end(), before);
      const int64_t top = cfg.group_score == GroupScore::max ? 1 : std::min<int64_t>(2, gs);
      for (int64_t j = 0; j < top; ++j) gscore[g] += sel[members[j]];
    }
    std::iota(gorder.begin(), gorder.end(), 0);
    std::sort(gorder.begin(), gorder.end(), [&](int32_t a, int32_t b) {
      return outranks(gscore[a], a, gscore[b], b, high);
    });
    for (int64_t j = 0; j < cfg.topk_groups; ++j)
      for (int64_t i = 0; i < gs; ++i) order.push_back(static_cast<int32_t>(gorder[j] * gs + i));
  } else {
    order.resize(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
  }
  if (cfg.tie_break == TieBreak::torch) {
    std::vector<std::pair<S, int64_t>> q;
    topk_torch(idx, sel.data(), E, k, q);
  } else {
    std::sort(order.begin(), order.end(), before);
    for (int64_t j = 0; j < k; ++j) idx[j] = order[j];
  }

  if (kept_softmax_kind(cfg.kind)) {
    S top = H[idx[0]];
    for (int64_t j = 1; j < k; ++j) top = std::max(top, H[idx[j]]);
    S kept = 0;
    for (int64_t j = 0; j < k; ++j) kept += (w[j] = std::exp(H[idx[j]] - top));
    for (int64_t j = 0; j < k; ++j) w[j] /= kept;
  } else {
    S kept = 0;
    for (int64_t j = 0; j < k; ++j) kept += (w[j] = s[idx[j]]);
    if (cfg.renormalize)
      for (int64_t j = 0; j < k; ++j) w[j] /= kept + S(kRenormEps);
  }
  if (cfg.scaling_factor != 1.0f)
    for (int64_t j = 0; j < k; ++j) w[j] *= S(cfg.scaling_factor);
  if (cfg.round_weights)
    for (int64_t j = 0; j < k; ++j) w[j] = S(round_bf16(static_cast<float>(w[j])));
}

// dH (E) += ∂L/∂H of one token through its gate weights and probs (docs/math.md), for every
// router kind. dw (k) = ∂L/∂weights or null; dprobs (E) = ∂L/∂probs or null. idx, w (k) and
// probs (E) are the forward's; scores (E) is sigmoid(H) for the sigmoid router (else unused);
// H (E) the noisy logits. scratch holds E values. Selection (bias, groups) is piecewise
// constant and carries no gradient.
template <typename S>
void scores_backward_row(S* dH, S* scratch, const S* dw, const S* dprobs, const int32_t* idx,
                         const S* w, const S* probs, const S* scores, const S* H,
                         const RouterConfig& cfg) {
  const int64_t E = cfg.n_experts, k = cfg.k;
  const S c = static_cast<S>(cfg.scaling_factor);
  if (kept_softmax_kind(cfg.kind)) {
    // w = c·softmax(H[kept]): ∂L/∂H[kept_j] = w_j·(dw_j - Σ_l w_l·dw_l / c).
    if (dw) {
      S dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += w[j] * dw[j];
      if (cfg.scaling_factor != 1.0f) dot /= c;
      for (int64_t j = 0; j < k; ++j) dH[idx[j]] += w[j] * (dw[j] - dot);
    }
    if (dprobs) {
      S dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += probs[e] * dprobs[e];
      for (int64_t e = 0; e < E; ++e) dH[e] += probs[e] * (dprobs[e] - dot);
    }
    return;
  }
  const bool sig = cfg.kind == RouterKind::sigmoid;
  const S* s = sig ? scores : probs;  // the score whose kept entries are the weights
  S* ds = scratch;                     // ∂L/∂s
  std::fill(ds, ds + E, S(0));
  if (dw) {
    if (cfg.renormalize) {
      // w_j = c·s_j / Z, Z = Σ_l s_l (+ε): ∂L/∂s_j = (c/Z)·(dw_j - Σ_l w_l·dw_l / c).
      S Z = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) Z += s[idx[j]];
      Z += S(kRenormEps);
      for (int64_t j = 0; j < k; ++j) dot += w[j] * dw[j];
      dot /= c;
      for (int64_t j = 0; j < k; ++j) ds[idx[j]] += c / Z * (dw[j] - dot);
    } else {
      for (int64_t j = 0; j < k; ++j) ds[idx[j]] += c * dw[j];
    }
  }
  if (!sig) {
    // s = probs = softmax(H): both terms go through the one softmax.
    if (dprobs)
      for (int64_t e = 0; e < E; ++e) ds[e] += dprobs[e];
    S dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += probs[e] * ds[e];
    for (int64_t e = 0; e < E; ++e) dH[e] += probs[e] * (ds[e] - dot);
    return;
  }
  if (dprobs) {
    // probs = s / Σs: ∂L/∂s_e += (dprobs_e - Σ_l probs_l·dprobs_l) / Σs.
    S ssum = 0, dot = 0;
    for (int64_t e = 0; e < E; ++e) ssum += s[e];
    for (int64_t e = 0; e < E; ++e) dot += probs[e] * dprobs[e];
    for (int64_t e = 0; e < E; ++e) ds[e] += (dprobs[e] - dot) / ssum;
  }
  // sigmoid' = σ(H)·σ(-H), computed from H: 1 - s loses the small values near s = 1.
  for (int64_t e = 0; e < E; ++e) dH[e] += sigmoid_score(H[e]) * sigmoid_score(-H[e]) * ds[e];
}

}  // namespace moe::detail
