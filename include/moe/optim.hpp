// Optimizers over a list of named (parameter, gradient) pairs, so that one optimizer can
// update an MoELayer together with other parameters (a linear head, say). Updates follow
// PyTorch's torch.optim definitions (docs/checkpoints.md states them); element arithmetic is
// in double, state is stored as float32 so that it fits a safetensors checkpoint.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

class MoELayer;
struct SafetensorsFile;

// One trainable tensor: `grad` has the shape of `param`. Both are owned by the caller and
// must outlive the optimizer.
struct ParamRef {
  std::string name;
  Tensor* param = nullptr;
  Tensor* grad = nullptr;
};

// Every parameter of the layer with its gradient, named prefix + the layer's own name.
std::vector<ParamRef> layer_params(MoELayer& layer, const std::string& prefix = "");

// SGD with momentum (PyTorch's torch.optim.SGD):
//   g = grad + weight_decay·p;  b = g on the first step, else momentum·b + (1−dampening)·g;
//   g = nesterov ? g + momentum·b : b (when momentum > 0);  p −= lr·g.
struct SGDConfig {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;  // needs momentum > 0 and dampening = 0
  double weight_decay = 0.0;
  void validate() const;  // throws moe::Error naming the bad field
};

// Adam (decoupled_weight_decay = false: L2 added to the gradient) and AdamW (true: the
// parameter shrinks by lr·weight_decay before the Adam step), with bias correction:
//   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;
//   p −= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // true: AdamW
  void validate() const;
};
AdamConfig adamw_config(double lr = 1e-3, double weight_decay = 0.01);

class Optimizer {
 public:
  virtual ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update from the current gradients. Throws moe::Error if a parameter or gradient no
  // longer has the shape it had when the optimizer was made.
  virtual void step() = 0;
  void zero_grad();  // sets every gradient to 0

  virtual const char* kind() const = 0;  // "sgd" | "adam" | "adamw"
  virtual double lr() const = 0;
  virtual void set_lr(double lr) = 0;    // for schedules; validated
  int64_t step_count() const { return step_; }
  const std::vector<ParamRef>& params() const { return params_; }

  // Checkpoint state. Tensors are named "optim.<slot>.<param>" (slots: SGD "momentum" when
  // momentum > 0; Adam/AdamW "m" and "v"); the step count and kind go in the metadata entry
  // {"optim": "{\"kind\":\"adam\",\"step\":12,...}"}.
  std::vector<std::pair<std::string, const Tensor*>> state_tensors() const;
  std::pair<std::string, std::string> state_metadata() const;
  // Restores step count and slots from a file holding what the two above wrote. Checks
  // kind, presence, dtype and shape of everything before changing anything.
  void load_state(const SafetensorsFile& file);

 protected:
  Optimizer(std::vector<ParamRef> params, std::vector<std::string> slot_names);
  void check_shapes() const;
  virtual std::string config_json() const = 0;

  std::vector<ParamRef> params_;
  std::vector<std::string> slot_names_;
  std::vector<std::vector<Tensor>> slots_;  // slots_[slot][param], shaped like the param
  int64_t step_ = 0;
};

class SGD final : public Optimizer {
 public:
  SGD(std::vector<ParamRef> params, const SGDConfig& cfg);
  void step() override;
  const char* kind() const override { return "sgd"; }
  double lr() const override { return cfg_.lr; }
  void set_lr(double lr) override;
  const SGDConfig& config() const { return cfg_; }

 private:
  std::string config_json() const override;
  SGDConfig cfg_;
};

class Adam final : public Optimizer {
 public:
  Adam(std::vector<ParamRef> params, const AdamConfig& cfg);
  void step() override;
  const char* kind() const override { return cfg_.decoupled_weight_decay ? "adamw" : "adam"; }
  double lr() const override { return cfg_.lr; }
  void set_lr(double lr) override;
  const AdamConfig& config() const { return cfg_; }

 private:
  std::string config_json() const override;
  AdamConfig cfg_;
};

// Global L2 norm of all gradients (summed in double, in list order, so deterministic); when it
// exceeds max_norm every gradient is scaled by max_norm / (norm + 1e-6), as PyTorch does.
// Returns the norm before clipping. A non-finite norm is returned and nothing is scaled, so
// that the caller can see it and skip the step. max_norm must be finite and > 0.
double clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm);
double clip_grad_norm(const std::vector<ParamRef>& params, double max_norm);

}  // namespace moe
