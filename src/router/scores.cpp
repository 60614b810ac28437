// The fast float row of the router family (scores.hpp): score functions, selection bias,
// group-limited selection and the kept weights, in the router's branch-free kernels and
// partial selection; and the jitter draws.
#include "router/scores.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/philox.hpp"
#include "common/vec_math.hpp"
#include "router/router_rows.hpp"
#include "router/row_kernels.hpp"

namespace moe::detail {

void jitter_row(float* u, int64_t d, float jitter, uint64_t seed, uint64_t step,
                int64_t token) {
  // Salted key and a counter block above every ε block (those are < 2^29): a stream of its own.
  const uint32_t k0 = static_cast<uint32_t>(seed) ^ 0x4a495454u;  // "JITT"
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32) ^ 0x45524a21u;
  for (int64_t b = 0; 4 * b < d; ++b) {
    const Philox4 r = philox4x32_10(philox_counter(step, token, 0x80000000ll + b), k0, k1);
    for (int64_t j = 0; j < 4 && 4 * b + j < d; ++j) {
      const float v = philox_u2(r.v[j]);  // [0, 1), a multiple of 2^-24
      u[4 * b + j] = 1.0f + jitter * (2.0f * v - 1.0f);
    }
  }
}

namespace {

// σ(z) without a branch: e = e^{-|z|} ≤ 1, σ = 1/(1+e) for z ≥ 0 and e/(1+e) below.
inline float sigmoid_f32(float z) {
  const float e = exp_f32(-abs_f32(z));
  const float r = 1.0f / (1.0f + e);
  return select_f32(z >= 0.0f, r, e * r);
}

// Per-thread scratch of the row: the selection values and the group scores.
struct RowScratch {
  std::vector<float> sel, gval;
  std::vector<int32_t> gidx;
  std::vector<std::pair<float, int64_t>> pairs;  // tie_break torch
};

}  // namespace

void route_scores_row_f32(int32_t* idx, float* w, float* probs, float* scores, const float* H,
                          const float* sel_bias, const RouterConfig& cfg) {
  const int64_t E = cfg.n_experts, k = cfg.k, G = cfg.n_groups;
  const bool high = cfg.tie_break == TieBreak::high;
  thread_local RowScratch scr;
  scr.sel.resize(static_cast<size_t>(E));
  float* sel = scr.sel.data();

  float mx = H[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, H[e]);
  const float inv_all = 1.0f / exp_row_f32(probs, H, mx, E);
  for (int64_t e = 0; e < E; ++e) probs[e] *= inv_all;
  const float* s = H;  // the score
  if (cfg.kind == RouterKind::softmax_topk) {
    s = probs;
  } else if (cfg.kind == RouterKind::sigmoid) {
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) scores[e] = sigmoid_f32(H[e]);
    float ssum = 0.0f;
    for (int64_t e = 0; e < E; ++e) ssum += scores[e];
    const float inv = 1.0f / ssum;
    for (int64_t e = 0; e < E; ++e) probs[e] = scores[e] * inv;
    s = scores;
  }
  if (sel_bias) {
    for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + sel_bias[e];
  } else {
    std::copy(s, s + E, sel);
  }

  if (G > 1) {
    // Group score: the sum of the group's two best (one for groups of one), or with
    // group_score max its best. Experts outside the best topk_groups groups drop to -inf;
    // validate() keeps k ≤ the eligible count.
    const int64_t gs = E / G, tg = cfg.topk_groups;
    scr.gval.resize(static_cast<size_t>(G + tg));
    scr.gidx.resize(static_cast<size_t>(tg + 2));
    float* gscore = scr.gval.data();
    for (int64_t g = 0; g < G; ++g) {
      const float* v = sel + g * gs;
      if (gs == 1) {
        gscore[g] = v[0];
        continue;
      }
      if (cfg.group_score == GroupScore::max) {
        float best = v[0];
        for (int64_t i = 1; i < gs; ++i) best = std::max(best, v[i]);
        gscore[g] = best;
        continue;
      }
      int32_t i2[2];
      float v2[2];
      select_topk_insert(i2, v2, v, gs, 2, high);
      gscore[g] = v2[0] + v2[1];
    }
    float* kept_val = gscore + G;
    int32_t* kept = scr.gidx.data();
    select_topk_insert(kept, kept_val, gscore, G, tg, high);
    // Mark the eligible groups in place of their scores, then mask the others' experts.
    for (int64_t g = 0; g < G; ++g) gscore[g] = 0.0f;
    for (int64_t j = 0; j < tg; ++j) gscore[kept[j]] = 1.0f;
    for (int64_t g = 0; g < G; ++g)
      if (gscore[g] == 0.0f) std::fill(sel + g * gs, sel + (g + 1) * gs, -INFINITY);
  }

  // w temporarily holds the selection values; the weights come from s.
  if (cfg.tie_break == TieBreak::torch)
    topk_torch(idx, sel, E, k, scr.pairs);
  else
    topk_rows_f32(idx, w, sel, E, 1, E, k, high);

  if (kept_softmax_kind(cfg.kind)) {
    float top = H[idx[0]];
    for (int64_t j = 1; j < k; ++j) top = std::max(top, H[idx[j]]);
    float kept = 0.0f;
    for (int64_t j = 0; j < k; ++j) kept += (w[j] = exp_f32(H[idx[j]] - top));
    const float inv = 1.0f / kept;
    for (int64_t j = 0; j < k; ++j) w[j] *= inv;
  } else {
    float kept = 0.0f;
    for (int64_t j = 0; j < k; ++j) kept += (w[j] = s[idx[j]]);
    if (cfg.renormalize) {
      const float inv = 1.0f / (kept + static_cast<float>(kRenormEps));
      for (int64_t j = 0; j < k; ++j) w[j] *= inv;
    }
  }
  if (cfg.scaling_factor != 1.0f)
    for (int64_t j = 0; j < k; ++j) w[j] *= cfg.scaling_factor;
  if (cfg.round_weights)
    for (int64_t j = 0; j < k; ++j) w[j] = round_bf16(w[j]);
}

}  // namespace moe::detail
