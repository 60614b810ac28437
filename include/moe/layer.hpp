// The MoE layer of SPEC §2–§4: router, capacity and dropping, sparse dispatch to stacked
// experts, weighted combine, balancing and z losses — forward and backward.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe/router.hpp"
#include "moe/tensor.hpp"

namespace moe {

// clamped_swiglu: GPT-OSS's experts, g = min(x·W1 + b1, L), u = clamp(x·W3 + b3, -L, L),
// h = (u + 1) ⊙ g·σ(α·g), out = h·W2 + b2 (L = swiglu_limit, α = swiglu_alpha).
enum class ExpertKind { linear_relu, mlp, swiglu, clamped_swiglu };
enum class Activation { relu, gelu, silu };
enum class DropPolicy { position, probs, random, priority };
// RouterKind (the router family's score functions) is in moe/router.hpp.
enum class AuxLossKind { switch_lb, seq, global, shazeer, none };  // "switch" | ...
enum class SecondExpertPolicy { all, random };
// SPEC §6: the precision of the expert products. The router is fp32 in every precision.
// int8, int4, mxfp4 and fp8 are evaluation only (evaluation_only below).
enum class Precision { fp32, bf16, int8, int4, mxfp4, fp8 };

// "linear_relu" | "mlp" | "swiglu" | "clamped_swiglu"
ExpertKind parse_expert_kind(const std::string& s);
Activation parse_activation(const std::string& s);   // "relu" | "gelu" | "silu"
DropPolicy parse_drop_policy(const std::string& s);  // "position" | "probs" | "random" | "priority"
RouterKind parse_router_kind(const std::string& s);  // "topk_softmax" | "softmax_topk" | ...
AuxLossKind parse_aux_loss(const std::string& s);    // "switch" | "seq" | "global" | ...
SecondExpertPolicy parse_second_expert_policy(const std::string& s);  // "all" | "random"
// "fp32" | "bf16" | "int8" | "int4" | "mxfp4" | "fp8"
Precision parse_precision(const std::string& s);
const char* to_string(ExpertKind v);
const char* to_string(Activation v);
const char* to_string(DropPolicy v);
const char* to_string(RouterKind v);
const char* to_string(AuxLossKind v);
const char* to_string(SecondExpertPolicy v);
const char* to_string(Precision v);
// The precisions a layer evaluates in but cannot train in: int8 and the low-bit formats.
constexpr bool evaluation_only(Precision p) { return p != Precision::fp32 && p != Precision::bf16; }
// The low-bit weight formats (docs/quant.md): weights held in their stored bytes.
constexpr bool low_bit(Precision p) {
  return p == Precision::int4 || p == Precision::mxfp4 || p == Precision::fp8;
}

struct MoEConfig {
  int64_t d_model = 0;
  int64_t n_experts = 0;
  int64_t k = 2;
  ExpertKind expert = ExpertKind::mlp;
  int64_t d_ff = 0;   // hidden width of mlp / swiglu / clamped_swiglu; 0 means 4·d_model
  int64_t d_out = 0;  // output width; 0 means d_model
  Activation activation = Activation::relu;
  bool expert_bias = true;                 // b1 (and b2 for mlp; b1, b3, b2 for
                                           // clamped_swiglu); swiglu has none
  float swiglu_alpha = 1.702f;             // clamped_swiglu: α of g·σ(α·g)
  float swiglu_limit = 7.0f;               // clamped_swiglu: L, the clamp of g and u
  std::optional<double> capacity_factor;   // nullopt: dropless; must be > 0 when set
  DropPolicy drop_policy = DropPolicy::position;
  Noise noise = Noise::learned;
  NoiseScale noise_scale = NoiseScale::softplus;
  float noise_stddev = 1.0f;
  float aux_alpha = 0.01f;
  float z_alpha = 0.0f;
  bool normalize_by_k = false;
  bool residual = false;  // y = x + MoE(x); needs d_out == d_model
  TieBreak tie_break = TieBreak::high;
  bool router_bias = false;       // b_g
  float router_init_std = 0.0f;   // 0: W_g and W_noise start at zero (Shazeer et al.)
  uint64_t seed = 0;              // initialisation and generated noise

  // The router family (docs/routing.md; SPEC §5 names in parentheses).
  RouterKind router_kind = RouterKind::topk_softmax;  // (router)
  bool renormalize = false;      // softmax_topk / sigmoid: kept weights divided by their sum
  float scaling_factor = 1.0f;   // gate weights multiplied by it (DeepSeek-V3)
  AuxLossKind aux_loss_kind = AuxLossKind::switch_lb;  // (aux_loss)
  int64_t seq_len = 0;           // aux_loss "seq": tokens per sequence; 0: the whole batch
  float bias_update_rate = 0.0f; // > 0: DeepSeek-V3 selection bias (expert_bias state)
  int64_t n_groups = 1;          // group-limited routing: E split into n_groups groups
  int64_t topk_groups = 1;       // ... of which the best topk_groups are eligible
  GroupScore group_score = GroupScore::top2_sum;  // a group's score: its best two s+b, or best
  // The expert_bias state (E) is added to the scores for selection even when
  // bias_update_rate is 0 (a bias loaded from a checkpoint, DeepSeek-V3's
  // e_score_correction_bias); bias_update_rate > 0 implies it.
  bool selection_bias = false;
  int64_t n_shared_experts = 0;  // always-active experts added to the routed output
  int64_t shared_d_ff = 0;       // hidden width of the shared experts; 0 means hidden()
  bool shared_gate = false;      // scale the shared output by sigmoid(x·w_shared_gate)
  SecondExpertPolicy second_expert_policy = SecondExpertPolicy::all;  // GShard
  float jitter = 0.0f;           // Switch: router input x·U(1-jitter, 1+jitter) in training

  // Expert products in bf16: fp32 masters (what param() holds and optimizers update), bf16
  // copies made again after each change, bf16 operands with fp32 accumulation; the router,
  // biases, activations, combine and gradients stay fp32 (docs/design.md, "bf16"). int8
  // (evaluation only): per-column int8 weights made from the masters, per-row int8
  // activations, exact int32 sums (docs/design.md, "Precision int8"). int4, mxfp4, fp8
  // (evaluation only): the expert matrices in a low-bit format, made from the masters by
  // libmoe's quantizers or read as a checkpoint stores them (docs/quant.md).
  Precision precision = Precision::fp32;
  // int4 made by libmoe: K values per scale (32, 64 or 128) and zero points (asymmetric
  // groups). 128 and symmetric by default: the fewest bytes a weight (4.25 bits), at the
  // same decode speed as 64 (docs/quant.md, "Measured").
  int64_t int4_group = 128;
  bool int4_zero_points = false;
  // Rounding as a transformers block computes in a bf16 model (docs/routing.md, "Rounding as
  // transformers"; set by moe.hf.replace_moe_blocks on bf16 models): the router logits rounded
  // to bf16 before the scores; the gate weights rounded to bf16, and each weighted expert
  // output w·y rounded to bf16 before the fp32 sum over k; in precision bf16, each expert
  // step's result rounded to bf16 (product, bias, activation, gate·up). Off: SPEC §6.
  bool round_router_logits = false;
  bool round_gate_weights = false;
  bool round_each_op = false;

  void validate() const;  // throws moe::Error naming the bad field
  void validate_router_family() const;  // part of validate()
  int64_t hidden() const { return d_ff > 0 ? d_ff : 4 * d_model; }
  int64_t out_dim() const { return d_out > 0 ? d_out : d_model; }
  int64_t shared_hidden() const { return shared_d_ff > 0 ? shared_d_ff : hidden(); }
  // The selection bias takes part in routing (selection_bias or bias_update_rate > 0).
  bool uses_selection_bias() const { return selection_bias || bias_update_rate > 0.0f; }
  RouterConfig router() const;
  // C = ceil(k·T/E·cf), or -1 when dropless.
  int64_t capacity(int64_t T) const;
};

struct ForwardOptions {
  bool training = true;
  const float* noise = nullptr;  // caller-given ε (T, E), else generated
  uint64_t step = 0;             // noise counter
  int64_t token_offset = 0;      // global index of this batch's first token
};

struct MoEStats {
  int64_t tokens = 0;
  int64_t capacity = -1;                  // -1: dropless
  std::vector<int64_t> load_before;       // (E) assignments routed to each expert
  std::vector<int64_t> load_after;        // (E) assignments kept after capacity
  int64_t dropped_assignments = 0;
  int64_t dropped_tokens = 0;             // tokens all of whose assignments were dropped
  int64_t experts_evaluated = 0;          // experts that received at least one row
  // Router "expert_choice" only (empty otherwise): (E + 1) tokens chosen by 0, 1, …, E experts.
  std::vector<int64_t> experts_per_token;
  double aux_loss = 0.0;
  double z_loss = 0.0;
};

// How a layer holds its weights.
struct LayerOptions {
  // false: the expert matrices (W1, W2, W3 and the shared experts' Ws1, Ws2, Ws3) are held only
  // in the layer's precision, without fp32 masters: a bf16 layer keeps just the bf16 copies
  // (what from_pretrained builds: a block's weights once, not three times). They start at zero
  // and are filled with set_expert_matrix(). Such a layer runs evaluation forwards only; its
  // parameter_names() leave those matrices out. In fp32 the masters are the held form, so
  // false changes nothing.
  bool masters = true;
  // false: every parameter starts at zero instead of its random initialisation (a loader
  // that overwrites them all skips drawing them); with masters = false the held bf16 expert
  // matrices are not even zeroed: the caller writes every one of them (set_expert_matrix)
  // before a forward.
  bool initialise = true;
};

namespace detail {
struct LayerAccess;
}

class MoELayer {
 public:
  explicit MoELayer(const MoEConfig& cfg);  // validates cfg, initialises from cfg.seed
  MoELayer(const MoEConfig& cfg, const LayerOptions& opt);
  ~MoELayer();
  MoELayer(MoELayer&&) noexcept;
  MoELayer& operator=(MoELayer&&) noexcept;

  const MoEConfig& config() const;

  // Names in a fixed order: W_g, b_g?, W_noise?, W1, b1?, W2, b2?, W3?, b3?, then the shared
  // experts' Ws1, bs1?, Ws2?, bs2?, Ws3?, bs3?, w_shared_gate? (n_shared_experts > 0)
  std::vector<std::string> parameter_names() const;
  Tensor& param(const std::string& name);  // throws moe::Error on an unknown name; see
                                           // weights_changed()
  const Tensor& param(const std::string& name) const;
  // Gradients are allocated (zeroed) on first use: the first backward or grad() call. A
  // layer used only for inference never holds them.
  Tensor& grad(const std::string& name);
  bool has_gradients() const;
  void zero_grad();

  // y is (T, d_out), x is (T, d_model). Saves what backward needs.
  void forward(float* y, const float* x, int64_t T, const ForwardOptions& opt = {});
  // dy is (T, d_out); dx (T, d_model) is assigned. Parameter gradients accumulate and
  // include the terms of aux_loss and z_loss (added to the caller's objective).
  void backward(float* dx, const float* dy);

  // The routed experts alone, with the routing given by the caller (what transformers'
  // pluggable experts functions and ScatterMoE take): y (T, d_out) = Σ_j weights[t,j] ·
  // E_{indices[t,j]}(x_t), indices and weights (T, k), k >= 1 of the caller's choosing. No
  // router, no shared experts, no residual, no capacity; backward() after it is refused, its
  // own backward is backward_routed. In the layer's precision. For the routing
  // of a forward (routing().indices/weights, dropless, no residual, no shared experts) it
  // gives that forward's output bit for bit. Throws moe::Error naming the first token with an
  // index outside 0..n_experts-1 or a non-finite weight or input.
  void forward_routed(float* y, const float* x, int64_t T, const int32_t* indices,
                      const float* weights, int64_t k);
  // The backward of the last forward_routed, once: dy (T, d_out); dx (T, d_model) and
  // dweights (T, k) = ∂L/∂weights are assigned; the routed experts' parameter gradients
  // accumulate (nothing for the router or the shared experts).
  void backward_routed(float* dx, float* dweights, const float* dy);

  // aux_loss "global": forget the expert loads accumulated by the training forwards since
  // the last reset (call it after each optimizer step). Harmless for the other kinds.
  void reset_global_load();

  // precision bf16: the bf16 copies of the expert weights are made again from the fp32
  // masters at the first forward after a change. param() (non-const), backward() and loading
  // a checkpoint mark them stale; a caller that writes through a pointer it kept from
  // param() without a backward in between (an optimizer step does follow a backward) calls
  // weights_changed(). Harmless in fp32.
  void weights_changed();

  // The config's rounding switches (round_router_logits, round_gate_weights, round_each_op)
  // and tie_break, changed on a built layer (moe.hf.replace_moe_blocks sets them on the blocks
  // it loads from a bf16 model); checked as validate() checks them. Nothing else changes.
  void set_rounding(bool router_logits, bool gate_weights, bool each_op, TieBreak tie_break);

  // Expert e's matrix of W1, W2, W3, Ws1, Ws2 or Ws3 from src, laid out like one slice of the
  // stacked parameter (e.g. W1: (d, F) row-major, "in × out"), written into whatever form the
  // layer holds: the fp32 master (then weights_changed()), or the copy in the layer's precision
  // directly when it holds no masters. Throws moe::Error on an unknown name or e out of range.
  void set_expert_matrix(const std::string& name, int64_t e, const float* src);
  // The same from bf16 values (uint16_t bit patterns), element (i, o) of the "in × out" matrix
  // at src[i·s_in + o·s_out]: a checkpoint's (out, in) bf16 tensor is s_in = 1, s_out = in.
  // A bf16 layer without masters packs them as they are (no rounding: they are bf16 already);
  // every other layer widens them to fp32 and goes through set_expert_matrix.
  void set_expert_matrix_bf16(const std::string& name, int64_t e, const uint16_t* src,
                              int64_t s_in, int64_t s_out);
  // Makes the copies in the layer's precision from the masters, then frees the masters: the
  // layer becomes evaluation-only (as LayerOptions{masters = false}). Nothing to do in fp32.
  void drop_masters();
  bool holds_masters() const;  // true in fp32
  // Expert matrix `name` (W1, W2, W3, Ws1, Ws2, Ws3 as the kind has), (E, in, out) in fp32,
  // from whatever form the layer holds: a copy of the master, or the values of the copies in
  // the layer's precision (bf16 widened exactly; int8 as q · scale). What save_checkpoint
  // writes for a layer without masters. Throws moe::Error on another name.
  Tensor expert_matrix(const std::string& name) const;

  const MoEStats& stats() const;
  double aux_loss() const;
  double z_loss() const;
  const RouterState& routing() const;

  // DeepSeek-V3 balancing without a loss (bias_update_rate > 0; docs/routing.md): the
  // selection bias b (E), added to the router's scores when choosing experts (training and
  // evaluation) and never to the gate weights. It starts at zero; update_expert_bias() moves
  // each b_i by rate·sign(mean load - load_i), load_i being the assignments to expert i
  // (before capacity) of the last training forward. Call it once after each optimizer step;
  // it does nothing when the rate is 0 or when no training forward came since the last
  // update. Checkpoints keep b (tensor "expert_bias"). With selection_bias and a rate of 0,
  // b is a fixed part of the router (DeepSeek-V3's e_score_correction_bias, set through
  // expert_bias() or a checkpoint) that never moves.
  void update_expert_bias();
  const Tensor& expert_bias() const;  // (E)
  Tensor& expert_bias();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  friend struct detail::LayerAccess;  // the library's loaders (layer/layer_access.hpp)
};

// SPEC §2 balancing loss on its own: indices (T, k), probs (T, E). Returns
// α·E·Σ f_i·P_i; when dprobs (T, E) is non-null it is assigned ∂L/∂probs.
double load_balancing_loss(float* dprobs, const int32_t* indices, const float* probs, int64_t T,
                           int64_t k, int64_t E, double alpha, bool normalize_by_k);

// SPEC §2 z-loss: c_z·(1/T)·Σ_t logsumexp(h_t)². dlogits (T, E) assigned when non-null.
double router_z_loss(float* dlogits, const float* logits, int64_t T, int64_t E, double c_z);

}  // namespace moe
