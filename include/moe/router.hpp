// The router of SPEC §1: raw logits h = x·W_g (+ b_g), optional noise, KeepTopK with a
// documented tie-break, and softmax over the kept logits.
//
// Conventions (for every forward/backward pair in libmoe): outputs first, then saved state,
// then inputs, then sizes. Parameter gradients accumulate (+=); activation gradients
// assign (=).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moe {

enum class Noise { none, fixed, learned };
enum class NoiseScale { softplus, linear };
// Ties of the top-k selection: to the higher or lower index, or as torch.topk on the CPU
// breaks them (torch: the order of its partial selection over (value, index) pairs; what a
// transformers router in the model's dtype chooses among equal logits, docs/routing.md).
enum class TieBreak { high, low, torch };
// The router family (docs/routing.md). Names in strings are those of SPEC §5; parsed in
// src/layer/config.cpp.
enum class RouterKind { topk_softmax, softmax_topk, sigmoid, expert_choice };
// Group-limited selection (n_groups > 1): what a group scores, from the selection values
// s + b of its experts. top2_sum: the sum of its two best (DeepSeek-V3); max: its best
// (DeepSeek-V2's group_limited_greedy).
enum class GroupScore { top2_sum, max };

Noise parse_noise(const std::string& s);            // "none" | "fixed" | "learned"
NoiseScale parse_noise_scale(const std::string& s);  // "softplus" | "linear"
TieBreak parse_tie_break(const std::string& s);      // "high" | "low" | "torch"
GroupScore parse_group_score(const std::string& s);  // "top2_sum" | "max"
const char* to_string(Noise v);
const char* to_string(NoiseScale v);
const char* to_string(TieBreak v);
const char* to_string(GroupScore v);

struct RouterConfig {
  int64_t d_model = 0;
  int64_t n_experts = 0;
  int64_t k = 1;
  Noise noise = Noise::none;
  NoiseScale noise_scale = NoiseScale::softplus;
  float noise_stddev = 1.0f;  // σ of Noise::fixed
  TieBreak tie_break = TieBreak::high;
  bool use_bias = false;      // b_g present
  // Score functions, selection bias, groups and jitter (docs/routing.md, src/router/scores.hpp).
  RouterKind kind = RouterKind::topk_softmax;
  bool renormalize = false;     // softmax_topk / sigmoid: kept weights divided by their sum
  float scaling_factor = 1.0f;  // multiplies the final gate weights
  int64_t n_groups = 1;         // group-limited selection: E split into n_groups groups...
  int64_t topk_groups = 1;      // ... of which the best topk_groups are eligible
  GroupScore group_score = GroupScore::top2_sum;  // ... ranked by this score of each group
  float jitter = 0.0f;          // training: router input x·U(1-jitter, 1+jitter)
  // As a bf16 torch router computes (docs/routing.md, "Rounding as transformers"): the logits
  // h (+ b_g) rounded to bf16 before the scores, and the final gate weights rounded to bf16.
  bool round_logits = false;
  bool round_weights = false;

  void validate() const;  // throws moe::Error naming the bad field
};

// Parameters by pointer; W_g is (d, E), b_g is (E) or null, W_noise is (d, E) for learned.
struct RouterParams {
  const float* W_g = nullptr;
  const float* b_g = nullptr;
  const float* W_noise = nullptr;
  const float* sel_bias = nullptr;  // (E) or null: added to the scores for selection only
};

// Where ε comes from. eps (T, E) given by the caller wins; otherwise ε is drawn from the
// counter-based generator keyed by (seed, step, token_offset + t, expert), so a token gets
// the same noise whatever the thread count, batch split or process layout.
struct NoiseSource {
  const float* eps = nullptr;
  uint64_t seed = 0;
  uint64_t step = 0;
  int64_t token_offset = 0;
};

// Everything routing produces, and what its backward needs. Buffers are resized on use and
// reused across calls (no allocation in steady state for a fixed T).
struct RouterState {
  int64_t T = 0, E = 0, k = 0;
  bool training = false;
  std::vector<int32_t> indices;  // (T, k), best first
  std::vector<float> weights;    // (T, k) gate weights (softmax over the kept H by default)
  std::vector<float> logits;     // h (T, E)
  std::vector<float> noisy;      // H (T, E) when noise was applied; empty otherwise (H = h)
  std::vector<float> probs;      // softmax(H) over all E (T, E)
  std::vector<float> eps;        // ε (T, E), when noise was applied
  std::vector<float> noise_pre;  // x·W_noise (T, E), learned noise only
  std::vector<float> scores;     // sigmoid(H) (T, E), router sigmoid only
  std::vector<float> jitter;     // the router input's factors (T, d), jitter in training only
  // Router "expert_choice" only (filled by the layer; empty otherwise): expert e chose the
  // ec_capacity tokens ec_tokens[e·C .. (e+1)·C), best first, with gates ec_gates = probs[t, e].
  // indices/weights above are then the token-choice top-k of probs, which the layer does not
  // use; dense_gates() is built from the ec_* fields.
  int64_t ec_capacity = 0;
  std::vector<int32_t> ec_tokens;  // (E, C)
  std::vector<float> ec_gates;     // (E, C)

  // Scratch, not a result: the fused (T, 2E) product and [W_g | W_noise] of forward, the
  // (T, 2E) gradient of backward. Kept here so that steady-state calls do not allocate;
  // mutable because router_backward reads the state as const but reuses this memory (so two
  // threads must not run backward on one state at once).
  mutable std::vector<float> work;

  std::vector<float> dense_gates() const;  // (T, E), zeros off the kept experts
  // H (T, E): the noisy logits, or the logits themselves when no noise was applied.
  const float* H() const { return noisy.empty() ? logits.data() : noisy.data(); }
};

struct RouterGrads {
  float* dW_g = nullptr;      // (d, E), accumulated
  float* db_g = nullptr;      // (E), accumulated, when use_bias
  float* dW_noise = nullptr;  // (d, E), accumulated, learned noise only
};

// Fast path: one GEMM against [W_g | W_noise], OpenMP over tokens, partial selection.
// x is (T, d). Throws moe::Error on a non-finite value in x, h or H naming the first bad
// token (its global index, token_offset + t).
void router_forward(RouterState& out, const float* x, const RouterParams& p,
                    const RouterConfig& cfg, int64_t T, bool training, const NoiseSource& noise);

// Plain loops, the test oracle. Same results as router_forward up to GEMM rounding.
void router_forward_ref(RouterState& out, const float* x, const RouterParams& p,
                        const RouterConfig& cfg, int64_t T, bool training,
                        const NoiseSource& noise);

// dweights is (T, k): ∂L/∂weights. dprobs is (T, E) or null: ∂L/∂probs (balancing loss).
// dlogits is (T, E) or null: an extra ∂L/∂h (z-loss). KeepTopK is piecewise constant.
// dx (T, d) is assigned when non-null.
void router_backward(float* dx, RouterGrads& g, const float* dweights, const float* dprobs,
                     const float* dlogits, const RouterState& saved, const float* x,
                     const RouterParams& p, const RouterConfig& cfg);

// ε for one (seed, step, global token, expert): Philox-4x32-10 and Box–Muller, bit-identical
// to the ε that routing draws. step enters the counter modulo 2^32.
float philox_normal(uint64_t seed, uint64_t step, int64_t token, int64_t expert);

// SPEC §5 `moe gate`: logits (T, E) → dense gates (T, E) of noisy top-k gating with fixed
// noise σ (none at evaluation), ties to the higher index.
std::vector<float> noisy_top_k_gating(const float* logits, int64_t T, int64_t E, int64_t k,
                                      float noise_stddev, bool training, uint64_t seed);

}  // namespace moe
