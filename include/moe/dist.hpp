// Expert parallelism over MPI: one MoE layer spread over the P ranks of a
// communicator. Each rank holds its own slice of the batch's tokens and a slice of the
// experts; the router is replicated. A step is
//
//   route locally → agree on capacity (global counts) → exchange per-(expert, rank) counts
//   (MPI_Alltoall) → exchange token rows (MPI_Alltoallv) → experts run on the rows they own
//   → return the outputs by the reverse exchange → combine locally,
//
// and backward mirrors both exchanges. Capacity is global: C = capacity(T_global), and the
// position policy fills slots in the single-process order (first choices in global token
// order, then second choices, …), so the result equals MoELayer run on the concatenation of
// all ranks' batches in rank order. docs/scaling.md states what is bit-identical and what is
// within a tolerance, and what a step costs on the wire.
//
// Link against moe_dist (built when CMake finds MPI, option MOE_WITH_MPI).
#pragma once
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/tensor.hpp"

namespace moe::dist {

// Which experts live where: block distribution, rank p owns [begin(p), end(p)); when P does
// not divide E the first E mod P ranks own one expert more. Ranks may own none (E < P).
struct ExpertShard {
  int64_t n_experts = 0;
  int n_ranks = 1;
  int64_t begin(int p) const;
  int64_t end(int p) const;
  int64_t count(int p) const { return end(p) - begin(p); }
  int owner(int64_t e) const;
};

// What the last forward + backward moved, as seen by this rank.
struct CommStats {
  int64_t row_bytes_sent = 0;      // token rows sent to other ranks (both directions of both passes)
  int64_t row_bytes_received = 0;  // token rows received from other ranks
  int64_t row_bytes_local = 0;     // rows a rank "sends" to itself (a memory copy)
  int64_t control_bytes = 0;       // counts, error flags, router gradients, loss statistics
  int64_t calls = 0;               // MPI calls
  double seconds = 0.0;            // wall time inside MPI, waiting for slower ranks included
  void reset() { *this = CommStats{}; }
};

class ExpertParallelMoE {
 public:
  // Collective over comm (which is duplicated, so the layer's messages never mix with the
  // caller's). Every rank must pass the same cfg: checked, a mismatch is a moe::Error on
  // every rank. Parameters start as MoELayer(cfg) would start them (the same seed), each
  // rank keeping the router and its own experts.
  ExpertParallelMoE(const MoEConfig& cfg, MPI_Comm comm);
  ~ExpertParallelMoE();
  ExpertParallelMoE(ExpertParallelMoE&&) noexcept;
  ExpertParallelMoE& operator=(ExpertParallelMoE&&) noexcept;

  const MoEConfig& config() const;
  int rank() const;
  int size() const;
  const ExpertShard& shard() const;
  int64_t expert_begin() const;  // this rank's experts are [expert_begin, expert_end)
  int64_t expert_end() const;

  // The names of MoELayer. Router parameters (W_g, b_g, W_noise) are whole and replicated;
  // expert parameters hold this rank's experts only: W1 is (E_local, d, d_ff), and so on.
  std::vector<std::string> parameter_names() const;
  Tensor& param(const std::string& name);
  const Tensor& param(const std::string& name) const;
  Tensor& grad(const std::string& name);
  void zero_grad();

  // Local, not collective: copies the router and this rank's experts from a single-process
  // layer with the same config, or writes them back into one.
  void load_from(const MoELayer& full);
  void store_into(MoELayer& full) const;

  // Collective. x is (T_local, d_model), y is (T_local, d_out); T_local may differ between
  // ranks (and be 0). Tokens are numbered globally: rank r's first token is
  // opt.token_offset + Σ_{q<r} T_q, and the generated noise uses that number. opt.noise, when
  // given, is this rank's (T_local, E) slice.
  void forward(float* y, const float* x, int64_t T_local, const ForwardOptions& opt = {});
  // Collective. dy is (T_local, d_out); dx (T_local, d_model) is assigned. Parameter
  // gradients accumulate; the router's are summed over ranks (in rank order, so every rank
  // holds the same bits) and include the terms of the global aux and z losses.
  void backward(float* dx, const float* dy);

  // Stats of the whole global batch (the same on every rank): loads, drops, losses.
  const MoEStats& stats() const;
  double aux_loss() const;
  double z_loss() const;
  const RouterState& routing() const;  // this rank's tokens only
  int64_t global_tokens() const;       // Σ T_local of the last forward
  int64_t token_offset() const;        // this rank's first global token of the last forward

  // Traffic of the calls since the last reset (forward resets nothing: call reset yourself).
  CommStats& comm_stats();

  // Σ of the squares of every gradient of the whole model (the router counted once, the
  // experts over all ranks), for global-norm clipping. Collective; the same on every rank.
  double global_grad_norm_sq();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Prints "rank R: message" on stderr and aborts every rank of comm (MPI_Abort): for a failure
// that other ranks cannot be told about in an orderly way.
[[noreturn]] void abort_all(MPI_Comm comm, const std::string& message, int code = 1);

}  // namespace moe::dist
