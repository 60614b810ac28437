// `moe train --expert-parallel`: the training loop of cmd_train.cpp over MPI ranks, with the
// MoE layer's experts sharded (moe::dist::ExpertParallelMoE). Every rank draws the same global
// batch and trains on its slice; the head is replicated and its gradients summed over ranks
// in rank order. The per-step losses equal the single-process run's with the same flags
// (docs/scaling.md states to what precision). Only rank 0 prints and writes.
#pragma once
#include <cstdint>
#include <string>

#include "moe/layer.hpp"
#include "train_task.hpp"

namespace moe::cli {

struct DistTrainArgs {
  MoEConfig model;
  TaskConfig task;
  int64_t steps = 0, batch = 0, eval_tokens = 0, d_target = 0, log_every = 1;
  double lr = 0.0;
  std::string out;
  bool json_out = false;
};

// Throws moe::Error when libmoe was built without MPI.
int run_train_expert_parallel(const DistTrainArgs& a);

}  // namespace moe::cli
