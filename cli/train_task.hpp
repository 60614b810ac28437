// The default task of `moe train`: a synthetic mixture of regimes. Each token belongs to one
// of R regimes; its input is drawn around that regime's centre and its target is produced by
// that regime's own hidden teacher network, y = tanh(x·A_r + a_r)·B_r. One dense network has
// to fit R unrelated functions at once; an MoE layer can give each regime its own experts,
// which is what Mixture-of-Experts is for. The router can learn the regimes because their
// centres are linearly separable.
#pragma once
#include <cstdint>
#include <vector>

namespace moe::cli {

struct TaskConfig {
  int64_t d_in = 32;            // input width (the model's d_model)
  int64_t d_out = 8;            // target width
  int64_t regimes = 8;
  int64_t teacher_hidden = 32;  // width of each regime's hidden teacher
  double center_scale = 1.0;    // centres ~ center_scale · N(0, I)
  double spread = 1.0;          // inputs ~ centre + spread · N(0, I)
  uint64_t seed = 7;

  void validate() const;  // throws moe::Error naming the bad field
};

class RegimeTask {
 public:
  explicit RegimeTask(const TaskConfig& cfg);
  const TaskConfig& config() const { return cfg_; }

  // Batch number `batch` of the stream: x (T, d_in), y (T, d_out), regime (T). A pure
  // function of (seed, batch, T): the same batch whatever else happened before.
  void sample(float* x, float* y, int32_t* regime, int64_t T, uint64_t batch) const;

  // A batch kept apart from the training stream, for evaluation.
  void sample_eval(float* x, float* y, int32_t* regime, int64_t T) const;

 private:
  TaskConfig cfg_;
  std::vector<float> centers_;  // (R, d_in)
  std::vector<float> A_, a_;    // (R, d_in, H), (R, H)
  std::vector<float> B_;        // (R, H, d_out)
  double y_scale_ = 1.0;        // makes the targets unit-variance
  double y_mean_ = 0.0;

  void teacher(float* y, const float* x, int32_t r) const;
};

}  // namespace moe::cli
