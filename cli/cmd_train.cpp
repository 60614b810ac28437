// `moe train`: trains an MoE layer (residual) plus a linear head with MSE and Adam on the
// embedded mixture-of-regimes task (train_task.hpp), reports progress, and leaves a run
// folder: metrics.csv, summary.json, regime_expert.csv, model.safetensors and PNG plots.
//
// Reproducibility: the data stream is a function of (task seed, step), the model's
// initialisation and routing noise of --seed, and every kernel sums in a fixed order, so two
// runs with the same flags give identical numbers. Only the timings (tokens_per_s, the
// "timing" block, the tokens_per_s column of metrics.csv) differ between runs.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "common/check.hpp"
#include "common/gemm.hpp"
#include "moe/checkpoint.hpp"
#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/optim.hpp"
#include "progress.hpp"
#include "run_files.hpp"
#include "train_dist.hpp"
#include "train_task.hpp"

namespace moe::cli {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct TrainOptions {
  // Model.
  int64_t experts = 8, k = 2, d_model = 32, d_ff = 64;
  std::string expert = "mlp", activation = "relu";
  std::string capacity_factor = "1.25";  // a number > 0, or "none" for dropless
  std::string drop_policy = "position";
  double aux_alpha = 0.01, z_alpha = 0.0;
  std::string noise = "learned", noise_scale = "softplus";
  double noise_stddev = 1.0, router_init_std = 0.0;
  bool dense = false;
  std::string precision = "fp32";
  // Router family (docs/routing.md).
  std::string router = "topk_softmax", aux_loss = "switch", second_expert_policy = "all";
  std::string group_score = "top2_sum";
  bool renormalize = false, shared_gate = false;
  double scaling_factor = 1.0, bias_update_rate = 0.0, jitter = 0.0;
  int64_t seq_len = 0, n_groups = 1, topk_groups = 1, n_shared_experts = 0;
  // Task.
  int64_t regimes = 8, d_target = 8, teacher_hidden = 32;
  double center_scale = 1.0, spread = 1.0;
  uint64_t task_seed = 7;
  // Training.
  int64_t steps = 3000, batch = 512, eval_tokens = 4096;
  double lr = 3e-3;
  uint64_t seed = 0;
  int threads = 0;
  // Output.
  std::string out;
  bool json_out = false, no_plots = false;
  int64_t log_every = 0;  // 0: about twenty lines per run
  bool expert_parallel = false;  // train_dist.cpp: experts sharded over MPI ranks
};

double cv_of(const std::vector<double>& v) {  // population std / mean
  if (v.empty()) return 0.0;
  double s = 0.0;
  for (double x : v) s += x;
  const double mean = s / static_cast<double>(v.size());
  if (mean <= 0.0) return 0.0;
  double s2 = 0.0;
  for (double x : v) s2 += (x - mean) * (x - mean);
  return std::sqrt(s2 / static_cast<double>(v.size())) / mean;
}

MoEConfig model_config(const TrainOptions& o) {
  MoEConfig c;
  c.d_model = o.d_model;
  c.n_experts = o.experts;
  c.k = o.k;
  c.expert = parse_expert_kind(o.expert);
  c.activation = parse_activation(o.activation);
  c.d_ff = o.d_ff;
  c.drop_policy = parse_drop_policy(o.drop_policy);
  c.noise = parse_noise(o.noise);
  c.noise_scale = parse_noise_scale(o.noise_scale);
  c.noise_stddev = static_cast<float>(o.noise_stddev);
  c.aux_alpha = static_cast<float>(o.aux_alpha);
  c.z_alpha = static_cast<float>(o.z_alpha);
  c.router_init_std = static_cast<float>(o.router_init_std);
  c.residual = true;
  c.seed = o.seed;
  c.router_kind = parse_router_kind(o.router);
  c.renormalize = o.renormalize;
  c.scaling_factor = static_cast<float>(o.scaling_factor);
  c.aux_loss_kind = parse_aux_loss(o.aux_loss);
  c.seq_len = o.seq_len;
  c.bias_update_rate = static_cast<float>(o.bias_update_rate);
  c.n_groups = o.n_groups;
  c.topk_groups = o.topk_groups;
  c.group_score = parse_group_score(o.group_score);
  c.n_shared_experts = o.n_shared_experts;
  c.shared_gate = o.shared_gate;
  c.second_expert_policy = parse_second_expert_policy(o.second_expert_policy);
  c.jitter = static_cast<float>(o.jitter);
  c.precision = parse_precision(o.precision);
  if (o.capacity_factor != "none") {
    double cf = 0.0;
    size_t used = 0;
    try {
      cf = std::stod(o.capacity_factor, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != o.capacity_factor.size())
      throw Error("capacity_factor: expected a number > 0 or 'none', got '" + o.capacity_factor +
                  "'");
    c.capacity_factor = cf;
  }
  if (o.dense) {
    // The dense baseline: one always-chosen expert whose hidden width is k·d_ff, so that
    // each token meets as many expert parameters as in the MoE model.
    c.n_experts = 1;
    c.k = 1;
    c.d_ff = o.d_ff * o.k;
    c.noise = Noise::none;
    c.aux_alpha = 0.0f;
    c.z_alpha = 0.0f;
    c.capacity_factor.reset();
    // The router family has nothing to act on with one expert.
    const MoEConfig defaults;
    c.router_kind = defaults.router_kind;
    c.renormalize = defaults.renormalize;
    c.scaling_factor = defaults.scaling_factor;
    c.aux_loss_kind = defaults.aux_loss_kind;
    c.bias_update_rate = defaults.bias_update_rate;
    c.n_groups = defaults.n_groups;
    c.topk_groups = defaults.topk_groups;
    c.group_score = defaults.group_score;
    c.second_expert_policy = defaults.second_expert_policy;
    c.jitter = defaults.jitter;
    c.drop_policy = defaults.drop_policy;
  }
  c.validate();
  return c;
}

// The model: y_hat = head(x + MoE(x)). The head is (d_model → d_target) with a bias.
struct Model {
  MoELayer layer;
  Tensor W_h, b_h, dW_h, db_h;  // (d, Dy), (Dy)
  std::vector<float> h, pred, dpred, dh, dx;

  Model(const MoEConfig& cfg, int64_t d_target)
      : layer(cfg),
        W_h({cfg.d_model, d_target}),
        b_h({d_target}),
        dW_h({cfg.d_model, d_target}),
        db_h({d_target}) {
    // The head starts at zero, so that the initial loss is the variance of the standardised
    // targets (1.0) and final/initial reads as the fraction of variance left unexplained.
  }

  int64_t d() const { return W_h.shape[0]; }
  int64_t dy() const { return W_h.shape[1]; }

  // Returns the MSE of the predictions for x (T, d) against y (T, Dy).
  double forward(const float* x, const float* y, int64_t T, const ForwardOptions& opt) {
    const int64_t D = d(), Dy = dy();
    h.resize(static_cast<size_t>(T * D));
    pred.resize(static_cast<size_t>(T * Dy));
    dpred.resize(pred.size());
    layer.forward(h.data(), x, T, opt);
    for (int64_t t = 0; t < T; ++t) std::copy(b_h.data.begin(), b_h.data.end(), &pred[t * Dy]);
    detail::gemm_f32(false, false, T, Dy, D, 1.0f, h.data(), D, W_h.ptr(), Dy, 1.0f, pred.data(),
                     Dy);
    double loss = 0.0;
    const double scale = 2.0 / static_cast<double>(T * Dy);
    for (int64_t i = 0; i < T * Dy; ++i) {
      const double e = static_cast<double>(pred[i]) - y[i];
      loss += e * e;
      dpred[i] = static_cast<float>(scale * e);
    }
    return loss / static_cast<double>(T * Dy);
  }

  // Gradients of the last forward's MSE (plus the layer's auxiliary losses), accumulated.
  void backward(int64_t T) {
    const int64_t D = d(), Dy = dy();
    dh.resize(static_cast<size_t>(T * D));
    dx.resize(static_cast<size_t>(T * D));
    detail::gemm_f32(true, false, D, Dy, T, 1.0f, h.data(), D, dpred.data(), Dy, 1.0f, dW_h.ptr(),
                     Dy);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < Dy; ++c) db_h.data[c] += dpred[t * Dy + c];
    detail::gemm_f32(false, true, T, D, Dy, 1.0f, dpred.data(), Dy, W_h.ptr(), Dy, 0.0f, dh.data(),
                     D);
    layer.backward(dx.data(), dh.data());
  }

  void zero_grad() {
    layer.zero_grad();
    std::fill(dW_h.data.begin(), dW_h.data.end(), 0.0f);
    std::fill(db_h.data.begin(), db_h.data.end(), 0.0f);
  }

  int64_t params_total() const {
    int64_t n = W_h.numel() + b_h.numel();
    for (const auto& name : layer.parameter_names()) n += layer.param(name).numel();
    return n;
  }
  // Parameters that one token's forward pass uses: the router, k of the E experts, the head.
  int64_t params_active() const {
    const MoEConfig& c = layer.config();
    int64_t n = W_h.numel() + b_h.numel();
    for (const auto& name : layer.parameter_names()) {
      const int64_t m = layer.param(name).numel();
      const bool expert = name == "W1" || name == "b1" || name == "W2" || name == "b2" ||
                          name == "W3" || name == "b3";
      n += expert ? m / c.n_experts * c.k : m;
    }
    return n;
  }
};

struct StepMetrics {
  double loss, aux, tokens_per_s, load_cv, drop_rate;
  std::vector<double> share;  // each expert's share of the step's assignments (before drops)
};

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string metrics_csv(const std::vector<StepMetrics>& m, int64_t E) {
  std::ostringstream os;
  os << "step,loss,aux_loss,tokens_per_s,load_cv,drop_rate";
  for (int64_t e = 0; e < E; ++e) os << ",share_" << e;
  os << "\n";
  for (size_t s = 0; s < m.size(); ++s) {
    const StepMetrics& r = m[s];
    os << s + 1 << ',' << fmt("%.7g", r.loss) << ',' << fmt("%.7g", r.aux) << ','
       << fmt("%.1f", r.tokens_per_s) << ',' << fmt("%.6g", r.load_cv) << ','
       << fmt("%.6g", r.drop_rate);
    for (double v : r.share) os << ',' << fmt("%.6g", v);
    os << "\n";
  }
  return os.str();
}

std::string regime_csv(const std::vector<std::vector<int64_t>>& counts) {
  std::ostringstream os;
  os << "regime";
  for (size_t e = 0; e < (counts.empty() ? 0 : counts[0].size()); ++e) os << ",expert_" << e;
  os << "\n";
  for (size_t r = 0; r < counts.size(); ++r) {
    os << r;
    for (int64_t c : counts[r]) os << ',' << c;
    os << "\n";
  }
  return os.str();
}

// Rounded so that summary.json reads cleanly; the rounding is deterministic, so two runs
// with the same seed still agree to the last digit.
double r6(double v) {
  if (!std::isfinite(v)) return v;
  return std::stod(fmt("%.6g", v));
}

json config_json(const TrainOptions& o, const MoEConfig& c) {
  // Every MoEConfig field as config_to_json writes it (the one list of fields), with d_ff
  // resolved and the kind of model.
  json m = json::parse(config_to_json(c));
  m["kind"] = o.dense ? "dense" : "moe";
  m["d_ff"] = c.hidden();
  json t;
  t["regimes"] = o.regimes;
  t["d_target"] = o.d_target;
  t["teacher_hidden"] = o.teacher_hidden;
  t["task_seed"] = o.task_seed;
  t["center_scale"] = o.center_scale;
  t["spread"] = o.spread;
  json tr;
  tr["steps"] = o.steps;
  tr["batch"] = o.batch;
  tr["lr"] = o.lr;
  tr["optimizer"] = "adam";
  tr["seed"] = o.seed;
  tr["eval_tokens"] = o.eval_tokens;
  tr["loss"] = "mse";
  return json{{"model", m}, {"task", t}, {"train", tr}};
}

int run_train(const TrainOptions& o) {
  const auto t_start = Clock::now();
  if (o.steps < 1) throw Error("steps: must be at least 1, got " + std::to_string(o.steps));
  if (o.batch < 1) throw Error("batch: must be at least 1, got " + std::to_string(o.batch));
  if (o.eval_tokens < 1)
    throw Error("eval_tokens: must be at least 1, got " + std::to_string(o.eval_tokens));
  if (!(o.lr > 0.0) || !std::isfinite(o.lr)) throw Error("lr: must be > 0, got " + fmt("%g", o.lr));
  if (o.threads < 0) throw Error("threads: must be >= 0, got " + std::to_string(o.threads));
  const MoEConfig cfg = model_config(o);
  // aux_loss seq cuts every batch into sequences: refuse a split that fails before anything
  // is written rather than at the first forward.
  if (cfg.aux_loss_kind == AuxLossKind::seq && cfg.seq_len > 0)
    for (const auto& [what, n] : {std::pair<const char*, int64_t>{"batch", o.batch},
                                  std::pair<const char*, int64_t>{"eval_tokens", o.eval_tokens}})
      if (n % cfg.seq_len != 0)
        throw Error(detail::cat("seq_len: aux_loss 'seq' needs ", what, " (", n,
                                ") to be a multiple of seq_len, got ", cfg.seq_len));
  TaskConfig tc;
  tc.d_in = o.d_model;
  tc.d_out = o.d_target;
  tc.regimes = o.regimes;
  tc.teacher_hidden = o.teacher_hidden;
  tc.seed = o.task_seed;
  tc.center_scale = o.center_scale;
  tc.spread = o.spread;
  const RegimeTask task(tc);
  // Steps here are small: with every core busy elsewhere, OpenMP threads that wait on each
  // other at barriers make a run many times slower than one thread would. Unless told a
  // thread count, let the runtime lower it to what the load average leaves (the results do
  // not depend on the thread count).
  const bool dynamic_threads =
      o.threads == 0 && !std::getenv("OMP_NUM_THREADS") && !std::getenv("OMP_DYNAMIC");
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (dynamic_threads) omp_set_dynamic(1);
  const std::string threads_desc =
      dynamic_threads ? detail::cat("up to ", omp_get_max_threads(), " threads, fewer when busy")
                      : detail::cat(omp_get_max_threads(), " threads");
  if (o.expert_parallel)
    return run_train_expert_parallel({cfg, tc, o.steps, o.batch, o.eval_tokens, o.d_target,
                                      o.log_every > 0 ? o.log_every : std::max<int64_t>(1, o.steps / 20),
                                      o.lr, o.out, o.json_out});

  // Human-readable output goes to stdout, or to stderr when stdout carries the JSON.
  std::FILE* human = o.json_out ? stderr : stdout;
  const std::string run_dir = make_run_dir(o.out);

  Model model(cfg, o.d_target);
  const int64_t E = cfg.n_experts, K = cfg.k, T = o.batch, D = o.d_model, Dy = o.d_target;

  AdamConfig acfg;
  acfg.lr = o.lr;
  std::vector<ParamRef> params = layer_params(model.layer);
  params.push_back({"head.W", &model.W_h, &model.dW_h});
  params.push_back({"head.b", &model.b_h, &model.db_h});
  Adam adam(params, acfg);

  std::fprintf(human, "moe train: %s on %lld regimes, %lld steps × %lld tokens, run folder %s\n",
               o.dense ? "dense baseline"
                       : ("MoE " + std::to_string(E) + " × " + to_string(cfg.expert) + ", k=" +
                          std::to_string(K))
                             .c_str(),
               static_cast<long long>(o.regimes), static_cast<long long>(o.steps),
               static_cast<long long>(T), run_dir.c_str());

  // Evaluation batch, fixed for the run: the loss before and after, and the specialisation.
  const int64_t Te = o.eval_tokens;
  std::vector<float> xe(static_cast<size_t>(Te * D)), ye(static_cast<size_t>(Te * Dy));
  std::vector<int32_t> re(static_cast<size_t>(Te));
  task.sample_eval(xe.data(), ye.data(), re.data(), Te);
  ForwardOptions eval_opt;
  eval_opt.training = false;
  const double initial_loss = model.forward(xe.data(), ye.data(), Te, eval_opt);

  std::vector<float> x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * Dy));
  std::vector<int32_t> reg(static_cast<size_t>(T));
  std::vector<StepMetrics> metrics;
  metrics.reserve(static_cast<size_t>(o.steps));
  const int64_t every = o.log_every > 0 ? o.log_every : std::max<int64_t>(1, o.steps / 20);
  Progress progress(human, o.steps, every);
  double train_seconds = 0.0;

  for (int64_t step = 0; step < o.steps; ++step) {
    task.sample(x.data(), y.data(), reg.data(), T, static_cast<uint64_t>(step));
    const auto t0 = Clock::now();
    ForwardOptions opt;
    opt.training = true;
    opt.step = static_cast<uint64_t>(step);
    opt.token_offset = 0;  // the step keys the noise; tokens are numbered within the batch
    model.zero_grad();
    const double loss = model.forward(x.data(), y.data(), T, opt);
    if (!std::isfinite(loss))
      throw std::runtime_error("training diverged: loss is " + fmt("%g", loss) + " at step " +
                               std::to_string(step + 1) + " (try a smaller --lr)");
    model.backward(T);
    adam.step();
    model.layer.update_expert_bias();  // DeepSeek-V3 selection bias; no-op unless its rate > 0
    model.layer.reset_global_load();  // aux_loss global: loads accumulate per optimizer step
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    train_seconds += dt;

    const MoEStats& st = model.layer.stats();
    StepMetrics m;
    m.loss = loss;
    m.aux = st.aux_loss;
    m.tokens_per_s = dt > 0 ? static_cast<double>(T) / dt : 0.0;
    std::vector<double> load(st.load_before.begin(), st.load_before.end());
    m.load_cv = cv_of(load);
    m.drop_rate = static_cast<double>(st.dropped_assignments) / static_cast<double>(T * K);
    for (double l : load) m.share.push_back(l / static_cast<double>(T * K));
    metrics.push_back(m);
    progress.update({step + 1, m.loss, m.aux, m.tokens_per_s, m.load_cv, m.drop_rate});
  }
  progress.finish();

  // Final evaluation, and which experts each regime's tokens went to.
  const double final_loss = model.forward(xe.data(), ye.data(), Te, eval_opt);
  const MoEStats& est = model.layer.stats();
  std::vector<double> eload(est.load_before.begin(), est.load_before.end());
  const double eval_load_cv = cv_of(eload);
  const double eval_drop =
      static_cast<double>(est.dropped_assignments) / static_cast<double>(Te * K);
  std::vector<std::vector<int64_t>> counts(static_cast<size_t>(o.regimes),
                                           std::vector<int64_t>(static_cast<size_t>(E), 0));
  const auto& idx = model.layer.routing().indices;
  for (int64_t t = 0; t < Te; ++t)
    for (int64_t j = 0; j < K; ++j) ++counts[re[t]][idx[t * K + j]];
  // Specialisation: purity is the share of a regime's assignments that land on its k most
  // used experts; top_expert the fraction of a regime's tokens that its most used expert
  // serves (1.0: one expert sees every token of the regime).
  double purity = 0.0, top_expert = 0.0;
  for (auto row : counts) {
    int64_t total = 0;
    for (int64_t c : row) total += c;
    std::sort(row.begin(), row.end(), std::greater<>());
    int64_t top = 0;
    for (int64_t j = 0; j < K; ++j) top += row[j];
    purity += total ? static_cast<double>(top) / static_cast<double>(total) : 1.0;
    top_expert += total ? static_cast<double>(row[0] * K) / static_cast<double>(total) : 1.0;
  }
  purity /= static_cast<double>(o.regimes);
  top_expert /= static_cast<double>(o.regimes);

  // Training-time balance over the last tenth of the run: loads summed over those steps (the
  // systematic imbalance), and the mean per-step CV (which includes sampling noise).
  const size_t n = metrics.size(), tail = std::max<size_t>(1, n / 10);
  std::vector<double> tail_load(static_cast<size_t>(E), 0.0);
  double tail_cv = 0.0, tail_drop = 0.0, tail_loss = 0.0, tail_aux = 0.0;
  // One field per loop: with GCC 12.2 at -O3 -march=native the single loop that summed five
  // fields of StepMetrics at once gave the sum of tokens_per_s as drop_rate (the same loop
  // with a print inside summed correctly; test_cli_train caught it).
  auto tail_sum = [&](double StepMetrics::*field) {
    double v = 0.0;
    for (size_t s = n - tail; s < n; ++s) v += metrics[s].*field;
    return v;
  };
  for (size_t s = n - tail; s < n; ++s)
    for (int64_t e = 0; e < E; ++e) tail_load[e] += metrics[s].share[e];
  tail_cv = tail_sum(&StepMetrics::load_cv);
  tail_drop = tail_sum(&StepMetrics::drop_rate);
  tail_loss = tail_sum(&StepMetrics::loss);
  tail_aux = tail_sum(&StepMetrics::aux);
  const double td = static_cast<double>(tail);
  std::vector<double> share_json;
  for (double v : tail_load) share_json.push_back(r6(v / td));
  const double tokens_per_s =
      train_seconds > 0 ? static_cast<double>(o.steps * T) / train_seconds : 0.0;

  json summary;
  summary["initial_loss"] = r6(initial_loss);
  summary["final_loss"] = r6(final_loss);
  summary["load_cv"] = r6(cv_of(tail_load));
  summary["drop_rate"] = r6(tail_drop / td);
  summary["tokens_per_s"] = std::round(tokens_per_s);
  summary["steps"] = o.steps;
  summary["loss_ratio"] = r6(final_loss / initial_loss);
  summary["first_train_loss"] = r6(metrics.front().loss);
  summary["final_train_loss"] = r6(tail_loss / td);
  summary["final_aux_loss"] = r6(tail_aux / td);
  summary["load_cv_per_step"] = r6(tail_cv / td);
  summary["expert_share"] = share_json;
  summary["eval_load_cv"] = r6(eval_load_cv);
  summary["eval_drop_rate"] = r6(eval_drop);
  summary["regime_purity"] = r6(purity);
  summary["regime_top_expert"] = r6(top_expert);
  summary["tokens"] = o.steps * T;
  summary["params_total"] = model.params_total();
  summary["params_active"] = model.params_active();
  summary["config"] = config_json(o, cfg);

  // Files. Each is complete or absent: written to a temporary name, then renamed.
  write_file_atomic(run_dir + "/metrics.csv", metrics_csv(metrics, E));
  write_file_atomic(run_dir + "/regime_expert.csv", regime_csv(counts));
  CheckpointExtras extras;
  extras.metadata["task"] = config_json(o, cfg)["task"].dump();
  extras.metadata["train"] = config_json(o, cfg)["train"].dump();
  extras.tensors = {{"head.W", &model.W_h}, {"head.b", &model.b_h}};
  extras.optimizer = &adam;
  save_checkpoint(model.layer, run_dir + "/model.safetensors", extras);
  const double wall = std::chrono::duration<double>(Clock::now() - t_start).count();
  summary["timing"] = {{"tokens_per_s", std::round(tokens_per_s)},
                       {"train_s", r6(train_seconds)},
                       {"wall_s_before_plots", r6(wall)},
                       {"threads", omp_get_max_threads()},
                       {"dynamic_threads", dynamic_threads}};
  summary["run_dir"] = run_dir;
  write_file_atomic(run_dir + "/summary.json", summary.dump(2) + "\n");

  PlotResult plots{false, "skipped (--no-plots)"};
  if (!o.no_plots) plots = run_plot_script(run_dir, o.json_out);

  // The summary table.
  const double total_wall = std::chrono::duration<double>(Clock::now() - t_start).count();
  auto row = [&](const char* name, const std::string& value) {
    std::fprintf(human, "  %-16s %s\n", name, value.c_str());
  };
  std::string model_desc =
      o.dense ? "dense: 1 × " + std::string(to_string(cfg.expert)) + " (d_ff " +
                    std::to_string(cfg.hidden()) + "), d_model " + std::to_string(D)
              : std::to_string(E) + " × " + to_string(cfg.expert) + " (d_ff " +
                    std::to_string(cfg.hidden()) + "), k " + std::to_string(K) + ", d_model " +
                    std::to_string(D);
  std::string cap = cfg.capacity_factor
                        ? "capacity factor " + fmt("%g", *cfg.capacity_factor) + " (" +
                              to_string(cfg.drop_policy) + ")"
                        : "dropless";
  std::fprintf(human, "\nsummary\n");
  row("model", model_desc + " + linear head, residual" +
                   (cfg.precision == Precision::fp32 ? "" : std::string(", ") +
                                                              to_string(cfg.precision)));
  if (!o.dense)
    row("routing", std::string("noise ") + to_string(cfg.noise) + ", aux α " +
                       fmt("%g", cfg.aux_alpha) + ", " + cap);
  row("parameters", std::to_string(model.params_total()) + " total, " +
                        std::to_string(model.params_active()) + " active per token");
  row("steps", std::to_string(o.steps) + " × " + std::to_string(T) + " tokens, Adam lr " +
                   fmt("%g", o.lr) + ", seed " + std::to_string(o.seed));
  row("eval loss", fmt("%.4f", initial_loss) + " → " + fmt("%.4f", final_loss) + "  (" +
                       fmt("%.1f", initial_loss / final_loss) + "× lower)");
  row("train loss", fmt("%.4f", metrics.front().loss) + " → " + fmt("%.4f", tail_loss / td) +
                        " (mean of the last " + std::to_string(tail) + " steps)");
  if (!o.dense) {
    row("load CV", fmt("%.3f", cv_of(tail_load)) + " (last " + std::to_string(tail) +
                       " steps), per step " + fmt("%.3f", tail_cv / td) + ", eval " +
                       fmt("%.3f", eval_load_cv));
    row("drop rate", fmt("%.2f%%", 100.0 * tail_drop / td) + " of assignments (eval " +
                         fmt("%.2f%%", 100.0 * eval_drop) + ")");
    std::string shares;
    for (double v : share_json) shares += fmt("%.1f ", 100.0 * v);
    row("expert share %", shares);
    row("specialisation", "a regime's most used expert serves " + fmt("%.0f%%", 100 * top_expert) +
                              " of its tokens; its top " + std::to_string(K) + " take " +
                              fmt("%.0f%%", 100 * purity) + " of its assignments");
  }
  row("speed", fmt("%.0f", tokens_per_s) + " tokens/s (" + threads_desc + "), " +
                   fmt("%.1f", total_wall) + " s in all");
  row("run folder", run_dir + "/ (metrics.csv, summary.json, regime_expert.csv, model.safetensors)");
  row("plots", plots.message);
  std::fflush(human);

  if (o.json_out) {
    json out = summary;
    out["timing"]["wall_s"] = r6(total_wall);
    std::cout << out.dump() << std::endl;
  }
  return 0;
}

}  // namespace

void add_train_command(CLI::App& app, int& status) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* sub = app.add_subcommand(
      "train",
      "Train an MoE layer (residual) + linear head with MSE and Adam on a synthetic mixture of "
      "regimes (each input cluster labelled by its own hidden teacher network). With no "
      "arguments, runs the embedded default (3000 steps of 512 tokens: seconds on 2 cores).");
  // A flag given twice takes its last value, so that scripts can append overrides.
  sub->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  sub->add_option("--steps", o->steps, "training steps")->capture_default_str();
  sub->add_option("--batch", o->batch, "tokens per step")->capture_default_str();
  sub->add_option("--experts", o->experts, "number of experts E")->capture_default_str();
  sub->add_option("--k", o->k, "experts per token")->capture_default_str();
  sub->add_option("--expert", o->expert, "expert kind: linear_relu | mlp | swiglu | clamped_swiglu")
      ->capture_default_str();
  sub->add_option("--activation", o->activation, "mlp activation: relu | gelu | silu")
      ->capture_default_str();
  sub->add_option("--d-model", o->d_model, "model width (= input width of the task)")
      ->capture_default_str();
  sub->add_option("--d-ff", o->d_ff, "expert hidden width")->capture_default_str();
  sub->add_option("--capacity-factor", o->capacity_factor,
                  "expert capacity factor (> 0), or 'none' for dropless")
      ->capture_default_str();
  sub->add_option("--drop-policy", o->drop_policy, "position | probs | random | priority")
      ->capture_default_str();
  sub->add_option("--aux-alpha", o->aux_alpha, "load-balancing loss weight α (0: off)")
      ->capture_default_str();
  sub->add_option("--z-alpha", o->z_alpha, "router z-loss weight")->capture_default_str();
  sub->add_option("--noise", o->noise, "routing noise: none | fixed | learned")
      ->capture_default_str();
  sub->add_option("--precision", o->precision,
                  "expert products: fp32 | bf16 (bf16 operands, fp32 accumulation and masters)")
      ->capture_default_str();
  sub->add_option("--noise-scale", o->noise_scale, "learned noise scale: softplus | linear")
      ->capture_default_str();
  sub->add_option("--noise-stddev", o->noise_stddev, "σ of fixed noise")->capture_default_str();
  sub->add_option("--router-init-std", o->router_init_std,
                  "std of the router's initial weights (0: zeros)")
      ->capture_default_str();
  sub->add_option("--router", o->router,
                  "router: topk_softmax | softmax_topk | sigmoid | expert_choice")
      ->capture_default_str();
  sub->add_flag("--renormalize", o->renormalize,
                "softmax_topk / sigmoid: divide the kept weights by their sum");
  sub->add_option("--scaling-factor", o->scaling_factor, "gate weights multiplied by it")
      ->capture_default_str();
  sub->add_option("--aux-loss", o->aux_loss, "balancing loss: switch | seq | global | shazeer | none")
      ->capture_default_str();
  sub->add_option("--seq-len", o->seq_len, "aux-loss seq: tokens per sequence (0: whole batch)")
      ->capture_default_str();
  sub->add_option("--bias-update-rate", o->bias_update_rate,
                  "DeepSeek-V3 loss-free balancing bias update rate (0: off)")
      ->capture_default_str();
  sub->add_option("--n-groups", o->n_groups, "group-limited routing: expert groups")
      ->capture_default_str();
  sub->add_option("--topk-groups", o->topk_groups, "group-limited routing: eligible groups")
      ->capture_default_str();
  sub->add_option("--group-score", o->group_score,
                  "group-limited routing: a group's score, top2_sum (DeepSeek-V3) | max (V2)")
      ->capture_default_str();
  sub->add_option("--n-shared-experts", o->n_shared_experts, "always-active shared experts")
      ->capture_default_str();
  sub->add_flag("--shared-gate", o->shared_gate, "scale shared experts by a sigmoid gate");
  sub->add_option("--second-expert-policy", o->second_expert_policy,
                  "GShard second expert: all | random")
      ->capture_default_str();
  sub->add_option("--jitter", o->jitter, "Switch multiplicative router-input jitter (0: off)")
      ->capture_default_str();
  sub->add_flag("--dense", o->dense,
                "train the dense baseline instead: one expert of hidden width k·d_ff (the same "
                "active parameter count)");
  sub->add_option("--regimes", o->regimes, "task: number of regimes (clusters)")
      ->capture_default_str();
  sub->add_option("--d-target", o->d_target, "task: target width")->capture_default_str();
  sub->add_option("--teacher-hidden", o->teacher_hidden, "task: hidden width of each teacher")
      ->capture_default_str();
  sub->add_option("--center-scale", o->center_scale,
                  "task: regime centres are center_scale·N(0, I)")
      ->capture_default_str();
  sub->add_option("--spread", o->spread, "task: inputs are centre + spread·N(0, I)")
      ->capture_default_str();
  sub->add_option("--task-seed", o->task_seed, "task: seed of the teachers and the data")
      ->capture_default_str();
  sub->add_option("--eval-tokens", o->eval_tokens, "tokens of the evaluation batch")
      ->capture_default_str();
  sub->add_option("--lr", o->lr, "Adam learning rate")->capture_default_str();
  sub->add_option("--seed", o->seed, "model initialisation and routing noise")
      ->capture_default_str();
  sub->add_option("--threads", o->threads, "OpenMP threads (0: OMP_NUM_THREADS, else all cores, fewer while the machine is busy)")
      ->capture_default_str();
  sub->add_option("--out", o->out, "run folder (default: a fresh runs/YYYYmmdd-HHMMSS)");
  sub->add_flag("--json", o->json_out,
                "print the summary as one JSON object on stdout (progress goes to stderr)");
  sub->add_flag("--no-plots", o->no_plots, "do not make the PNG plots (plot_run.py)");
  sub->add_option("--log-every", o->log_every,
                  "steps between progress lines when not on a terminal (0: about 20 lines)")
      ->capture_default_str();
  sub->add_flag("--expert-parallel", o->expert_parallel,
                "run under mpirun: experts sharded over the ranks, each rank training on its "
                "slice of the batch; the same losses as one process (metrics.csv and "
                "summary.json only, written by rank 0)");
  sub->footer(
      "Run folder: metrics.csv (per step: loss, aux, tokens/s, load CV, drop rate, each expert's "
      "share), summary.json, regime_expert.csv, model.safetensors, and PNG plots (loss.png, "
      "experts.png, specialisation.png) made by share/libmoe/plot_run.py beside this moe's bin/ "
      "folder, under MOE_PYTHON, else the build tree's project environment .venv/bin/python, "
      "else the python3 beside moe (a virtual environment's), else /usr/bin/python3; the "
      "plots need matplotlib there.");
  sub->callback([o, &status] { status = run_train(*o); });
}

}  // namespace moe::cli
