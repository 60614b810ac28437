#include "train_dist.hpp"

#include "moe/error.hpp"

#ifndef MOE_WITH_MPI

namespace moe::cli {
int run_train_expert_parallel(const DistTrainArgs&) {
  throw Error("--expert-parallel: this moe was built without MPI (configure with MOE_WITH_MPI=ON)");
}
}  // namespace moe::cli

#else

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/gemm.hpp"
#include "moe/dist.hpp"
#include "moe/optim.hpp"
#include "run_files.hpp"

namespace moe::cli {

namespace {

// MPI for the length of the command, when nobody started it (a plain `moe train
// --expert-parallel` runs as one rank).
struct MpiSession {
  bool owned = false;
  MpiSession() {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      MPI_Init(nullptr, nullptr);
      owned = true;
    }
  }
  ~MpiSession() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned && !fin) MPI_Finalize();
  }
};

// Σ over ranks, added in rank order: the same bits on every rank and in every run.
template <typename V>
void sum_in_rank_order(V* data, int64_t n, MPI_Datatype type, int P) {
  std::vector<V> all(static_cast<size_t>(n * P));
  MPI_Allgather(data, static_cast<int>(n), type, all.data(), static_cast<int>(n), type,
                MPI_COMM_WORLD);
  for (int64_t i = 0; i < n; ++i) {
    V acc = all[i];
    for (int p = 1; p < P; ++p) acc += all[p * n + i];
    data[i] = acc;
  }
}

// The model of cmd_train.cpp, y_hat = head(x + MoE(x)), on this rank's tokens.
struct DistModel {
  dist::ExpertParallelMoE layer;
  Tensor W_h, b_h, dW_h, db_h;
  std::vector<float> h, pred, dpred, dh, dx;
  int P;

  DistModel(const MoEConfig& cfg, int64_t Dy, int nranks)
      : layer(cfg, MPI_COMM_WORLD), W_h({cfg.d_model, Dy}), b_h({Dy}), dW_h({cfg.d_model, Dy}),
        db_h({Dy}), P(nranks) {}

  // MSE over the global batch (Tg tokens), this rank holding T of them.
  double forward(const float* x, const float* y, int64_t T, int64_t Tg, const ForwardOptions& o) {
    const int64_t D = W_h.shape[0], Dy = W_h.shape[1];
    h.resize(static_cast<size_t>(T * D));
    pred.resize(static_cast<size_t>(T * Dy));
    dpred.resize(pred.size());
    layer.forward(h.data(), x, T, o);
    for (int64_t t = 0; t < T; ++t) std::copy(b_h.data.begin(), b_h.data.end(), &pred[t * Dy]);
    detail::gemm_f32(false, false, T, Dy, D, 1.0f, h.data(), D, W_h.ptr(), Dy, 1.0f, pred.data(),
                     Dy);
    double sq = 0.0;
    const double scale = 2.0 / static_cast<double>(Tg * Dy);
    for (int64_t i = 0; i < T * Dy; ++i) {
      const double e = static_cast<double>(pred[i]) - y[i];
      sq += e * e;
      dpred[i] = static_cast<float>(scale * e);
    }
    sum_in_rank_order(&sq, 1, MPI_DOUBLE, P);
    return sq / static_cast<double>(Tg * Dy);
  }

  void backward(int64_t T) {
    const int64_t D = W_h.shape[0], Dy = W_h.shape[1];
    std::vector<float> part(static_cast<size_t>(D * Dy + Dy), 0.0f);
    detail::gemm_f32(true, false, D, Dy, T, 1.0f, h.data(), D, dpred.data(), Dy, 0.0f,
                     part.data(), Dy);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < Dy; ++c) part[D * Dy + c] += dpred[t * Dy + c];
    sum_in_rank_order(part.data(), static_cast<int64_t>(part.size()), MPI_FLOAT, P);
    for (int64_t i = 0; i < D * Dy; ++i) dW_h.data[i] += part[i];
    for (int64_t c = 0; c < Dy; ++c) db_h.data[c] += part[D * Dy + c];
    dh.resize(static_cast<size_t>(T * D));
    dx.resize(static_cast<size_t>(T * D));
    detail::gemm_f32(false, true, T, D, Dy, 1.0f, dpred.data(), Dy, W_h.ptr(), Dy, 0.0f, dh.data(),
                     D);
    layer.backward(dx.data(), dh.data());
  }
};

}  // namespace

int run_train_expert_parallel(const DistTrainArgs& a) {
  MpiSession mpi;
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const RegimeTask task(a.task);
  const MoEConfig& cfg = a.model;
  const int64_t D = cfg.d_model, Dy = a.d_target, K = cfg.k;
  DistModel model(cfg, Dy, P);

  // This rank's slice of a global batch of n tokens: the first n mod P ranks hold one more.
  auto slice = [&](int64_t n) {
    const int64_t base = n / P, extra = n % P;
    const int64_t off = rank * base + std::min<int64_t>(rank, extra);
    return std::pair<int64_t, int64_t>{off, base + (rank < extra ? 1 : 0)};
  };

  std::vector<ParamRef> params;
  for (const auto& n : model.layer.parameter_names())
    params.push_back({n, &model.layer.param(n), &model.layer.grad(n)});
  params.push_back({"head.W", &model.W_h, &model.dW_h});
  params.push_back({"head.b", &model.b_h, &model.db_h});
  AdamConfig acfg;
  acfg.lr = a.lr;
  Adam adam(params, acfg);

  std::FILE* human = a.json_out ? stderr : stdout;
  const std::string run_dir = rank == 0 ? make_run_dir(a.out) : std::string();
  if (rank == 0)
    std::fprintf(human,
                 "moe train --expert-parallel: %d ranks, %lld experts (%lld on rank 0), %lld "
                 "steps × %lld tokens, run folder %s\n",
                 P, static_cast<long long>(cfg.n_experts),
                 static_cast<long long>(model.layer.expert_end() - model.layer.expert_begin()),
                 static_cast<long long>(a.steps), static_cast<long long>(a.batch),
                 run_dir.c_str());

  const int64_t Te = a.eval_tokens, T = a.batch;
  std::vector<float> xe(static_cast<size_t>(Te * D)), ye(static_cast<size_t>(Te * Dy));
  std::vector<int32_t> re(static_cast<size_t>(Te));
  task.sample_eval(xe.data(), ye.data(), re.data(), Te);
  const auto [eoff, eT] = slice(Te);
  ForwardOptions eval_opt;
  eval_opt.training = false;
  const double initial_loss =
      model.forward(xe.data() + eoff * D, ye.data() + eoff * Dy, eT, Te, eval_opt);

  std::vector<float> x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * Dy));
  std::vector<int32_t> reg(static_cast<size_t>(T));
  const auto [off, Tr] = slice(T);
  std::ostringstream csv;
  csv << "step,loss,aux_loss,drop_rate\n";
  std::vector<double> losses;
  for (int64_t step = 0; step < a.steps; ++step) {
    task.sample(x.data(), y.data(), reg.data(), T, static_cast<uint64_t>(step));
    ForwardOptions opt;
    opt.step = static_cast<uint64_t>(step);
    adam.zero_grad();
    const double loss = model.forward(x.data() + off * D, y.data() + off * Dy, Tr, T, opt);
    if (!std::isfinite(loss))  // the same value on every rank: all stop together
      throw std::runtime_error("training diverged: loss is " + std::to_string(loss) +
                               " at step " + std::to_string(step + 1) + " (try a smaller --lr)");
    model.backward(Tr);
    adam.step();
    losses.push_back(loss);
    const MoEStats& st = model.layer.stats();
    const double drop = static_cast<double>(st.dropped_assignments) / static_cast<double>(T * K);
    char line[160];
    std::snprintf(line, sizeof line, "%lld,%.7g,%.7g,%.6g\n", static_cast<long long>(step + 1),
                  loss, st.aux_loss, drop);
    csv << line;
    if (rank == 0 && ((step + 1) % a.log_every == 0 || step + 1 == a.steps))
      std::fprintf(human, "  step %6lld  loss %.6f  aux %.5f  drop %.2f%%\n",
                   static_cast<long long>(step + 1), loss, st.aux_loss, 100.0 * drop);
  }
  const double final_loss =
      model.forward(xe.data() + eoff * D, ye.data() + eoff * Dy, eT, Te, eval_opt);

  if (rank == 0) {
    nlohmann::json s;
    s["ranks"] = P;
    s["initial_loss"] = initial_loss;
    s["final_loss"] = final_loss;
    s["first_train_loss"] = losses.front();
    s["last_train_loss"] = losses.back();
    s["train_losses"] = losses;
    s["steps"] = a.steps;
    s["batch"] = a.batch;
    s["run_dir"] = run_dir;
    write_file_atomic(run_dir + "/metrics.csv", csv.str());
    write_file_atomic(run_dir + "/summary.json", s.dump(2) + "\n");
    std::fprintf(human, "eval loss %.6f → %.6f; metrics.csv and summary.json in %s\n",
                 initial_loss, final_loss, run_dir.c_str());
    std::fflush(human);
    if (a.json_out) std::cout << s.dump() << std::endl;
  }
  return 0;
}

}  // namespace moe::cli

#endif
