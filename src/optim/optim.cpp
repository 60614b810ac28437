#include "moe/optim.hpp"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/check.hpp"
#include "moe/checkpoint.hpp"

namespace moe {

using detail::cat;

namespace {

bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0.0; }

void check_param_list(const std::vector<ParamRef>& params) {
  std::set<std::string> seen;
  std::set<const Tensor*> tensors;
  for (const ParamRef& p : params) {
    MOE_REQUIRE(!p.name.empty(), "optimizer: a parameter has an empty name");
    MOE_REQUIRE(seen.insert(p.name).second, "optimizer: parameter '", p.name, "' listed twice");
    MOE_REQUIRE(p.param != nullptr && p.grad != nullptr, "optimizer: parameter '", p.name,
                "' has a null param or grad");
    MOE_REQUIRE(p.param != p.grad, "optimizer: parameter '", p.name,
                "' uses the same tensor as its gradient");
    MOE_REQUIRE(tensors.insert(p.param).second && tensors.insert(p.grad).second,
                "optimizer: parameter '", p.name,
                "' shares a tensor with another parameter (it would be updated twice)");
    MOE_REQUIRE(p.param->shape == p.grad->shape &&
                    p.param->data.size() == p.grad->data.size(),
                "optimizer: parameter '", p.name, "' has shape ", shape_str(p.param->shape),
                " but its gradient has ", shape_str(p.grad->shape));
  }
}

}  // namespace

// ---- configs --------------------------------------------------------------------------------

void SGDConfig::validate() const {
  MOE_REQUIRE(finite_nonneg(lr), "sgd lr: must be finite and >= 0, got ", lr);
  MOE_REQUIRE(finite_nonneg(momentum), "sgd momentum: must be finite and >= 0, got ", momentum);
  MOE_REQUIRE(std::isfinite(dampening) && dampening >= 0.0 && dampening <= 1.0,
              "sgd dampening: must be in [0, 1], got ", dampening);
  MOE_REQUIRE(finite_nonneg(weight_decay), "sgd weight_decay: must be finite and >= 0, got ",
              weight_decay);
  MOE_REQUIRE(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "sgd nesterov: needs momentum > 0 and dampening = 0, got momentum ", momentum,
              " and dampening ", dampening);
}

void AdamConfig::validate() const {
  const char* who = decoupled_weight_decay ? "adamw" : "adam";
  MOE_REQUIRE(finite_nonneg(lr), who, " lr: must be finite and >= 0, got ", lr);
  MOE_REQUIRE(std::isfinite(beta1) && beta1 >= 0.0 && beta1 < 1.0, who,
              " beta1: must be in [0, 1), got ", beta1);
  MOE_REQUIRE(std::isfinite(beta2) && beta2 >= 0.0 && beta2 < 1.0, who,
              " beta2: must be in [0, 1), got ", beta2);
  MOE_REQUIRE(std::isfinite(eps) && eps > 0.0, who,
              " eps: must be finite and > 0 (it keeps a zero gradient from dividing by zero), got ",
              eps);
  MOE_REQUIRE(finite_nonneg(weight_decay), who, " weight_decay: must be finite and >= 0, got ",
              weight_decay);
}

AdamConfig adamw_config(double lr, double weight_decay) {
  AdamConfig c;
  c.lr = lr;
  c.weight_decay = weight_decay;
  c.decoupled_weight_decay = true;
  return c;
}

// ---- Optimizer ------------------------------------------------------------------------------

Optimizer::Optimizer(std::vector<ParamRef> params, std::vector<std::string> slot_names)
    : params_(std::move(params)), slot_names_(std::move(slot_names)) {
  check_param_list(params_);
  slots_.resize(slot_names_.size());
  for (auto& slot : slots_)
    for (const ParamRef& p : params_) slot.emplace_back(p.param->shape, 0.0f);
}

Optimizer::~Optimizer() = default;

void Optimizer::zero_grad() {
  for (const ParamRef& p : params_) std::fill(p.grad->data.begin(), p.grad->data.end(), 0.0f);
}

void Optimizer::check_shapes() const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& p = params_[i];
    const size_t n = slots_.empty() ? p.param->data.size() : slots_[0][i].data.size();
    MOE_REQUIRE(p.param->data.size() == n && p.grad->data.size() == n, "optimizer: parameter '",
                p.name, "' changed size since the optimizer was made (param ",
                shape_str(p.param->shape), ", grad ", shape_str(p.grad->shape), ")");
  }
}

std::vector<std::pair<std::string, const Tensor*>> Optimizer::state_tensors() const {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (size_t s = 0; s < slots_.size(); ++s)
    for (size_t i = 0; i < params_.size(); ++i)
      out.emplace_back(cat("optim.", slot_names_[s], ".", params_[i].name), &slots_[s][i]);
  return out;
}

std::pair<std::string, std::string> Optimizer::state_metadata() const {
  nlohmann::ordered_json j;
  j["kind"] = kind();
  j["step"] = step_;
  j["config"] = nlohmann::ordered_json::parse(config_json());
  return {"optim", j.dump()};
}

void Optimizer::load_state(const SafetensorsFile& file) {
  const auto it = file.metadata.find("optim");
  MOE_REQUIRE(it != file.metadata.end(),
              "optimizer state: the checkpoint has no __metadata__ entry 'optim'");
  int64_t step = 0;
  try {
    const auto j = nlohmann::json::parse(it->second);
    MOE_REQUIRE(j.is_object() && j.contains("kind") && j["kind"].is_string(),
                "optimizer state: 'optim' metadata has no string 'kind'");
    const std::string k = j["kind"].get<std::string>();
    MOE_REQUIRE(k == kind(), "optimizer state: the checkpoint holds '", k,
                "' state but the optimizer is '", kind(), "'");
    MOE_REQUIRE(j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() >= 0,
                "optimizer state: 'optim' metadata has no whole-number 'step' >= 0");
    step = j["step"].get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat("optimizer state: 'optim' metadata is not valid JSON (", e.what(), ")"));
  }
  // Check everything first: a refused file leaves the optimizer as it was.
  std::vector<std::vector<const Tensor*>> found(slots_.size());
  for (size_t s = 0; s < slots_.size(); ++s) {
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string name = cat("optim.", slot_names_[s], ".", params_[i].name);
      const NamedTensor* t = file.find(name);
      MOE_REQUIRE(t != nullptr, "optimizer state: tensor '", name, "' is missing");
      MOE_REQUIRE(t->dtype == "F32", "optimizer state: tensor '", name,
                  "' has dtype ", t->dtype, ", expected F32");
      MOE_REQUIRE(t->tensor.shape == params_[i].param->shape, "optimizer state: tensor '", name,
                  "' has shape ", shape_str(t->tensor.shape), ", expected ",
                  shape_str(params_[i].param->shape));
      found[s].push_back(&t->tensor);
    }
  }
  for (size_t s = 0; s < slots_.size(); ++s)
    for (size_t i = 0; i < params_.size(); ++i) slots_[s][i] = *found[s][i];
  step_ = step;
}

// ---- SGD ------------------------------------------------------------------------------------

SGD::SGD(std::vector<ParamRef> params, const SGDConfig& cfg)
    : Optimizer(std::move(params), cfg.momentum > 0.0 ? std::vector<std::string>{"momentum"}
                                                      : std::vector<std::string>{}),
      cfg_(cfg) {
  cfg_.validate();
}

void SGD::set_lr(double lr) {
  SGDConfig c = cfg_;
  c.lr = lr;
  c.validate();
  cfg_ = c;
}

std::string SGD::config_json() const {
  nlohmann::ordered_json j = {{"lr", cfg_.lr},
                              {"momentum", cfg_.momentum},
                              {"dampening", cfg_.dampening},
                              {"nesterov", cfg_.nesterov},
                              {"weight_decay", cfg_.weight_decay}};
  return j.dump();
}

void SGD::step() {
  check_shapes();
  const bool first = step_ == 0;
  ++step_;
  const double lr = cfg_.lr, mu = cfg_.momentum, damp = cfg_.dampening, wd = cfg_.weight_decay;
  for (size_t i = 0; i < params_.size(); ++i) {
    float* p = params_[i].param->data.data();
    const float* g = params_[i].grad->data.data();
    float* b = mu > 0.0 ? slots_[0][i].data.data() : nullptr;
    const size_t n = params_[i].param->data.size();
    for (size_t j = 0; j < n; ++j) {
      double d = static_cast<double>(g[j]) + wd * p[j];
      if (b) {
        const double buf = first ? d : mu * b[j] + (1.0 - damp) * d;
        b[j] = static_cast<float>(buf);
        d = cfg_.nesterov ? d + mu * buf : buf;
      }
      p[j] = static_cast<float>(p[j] - lr * d);
    }
  }
}

// ---- Adam / AdamW ---------------------------------------------------------------------------

Adam::Adam(std::vector<ParamRef> params, const AdamConfig& cfg)
    : Optimizer(std::move(params), {"m", "v"}), cfg_(cfg) {
  cfg_.validate();
}

void Adam::set_lr(double lr) {
  AdamConfig c = cfg_;
  c.lr = lr;
  c.validate();
  cfg_ = c;
}

std::string Adam::config_json() const {
  nlohmann::ordered_json j = {{"lr", cfg_.lr},
                              {"beta1", cfg_.beta1},
                              {"beta2", cfg_.beta2},
                              {"eps", cfg_.eps},
                              {"weight_decay", cfg_.weight_decay},
                              {"decoupled_weight_decay", cfg_.decoupled_weight_decay}};
  return j.dump();
}

void Adam::step() {
  check_shapes();
  ++step_;
  const double lr = cfg_.lr, b1 = cfg_.beta1, b2 = cfg_.beta2, eps = cfg_.eps;
  const double wd = cfg_.weight_decay;
  const double t = static_cast<double>(step_);
  const double bc1 = 1.0 - std::pow(b1, t);
  const double sqrt_bc2 = std::sqrt(1.0 - std::pow(b2, t));
  const double step_size = lr / bc1;
  const double shrink = cfg_.decoupled_weight_decay ? 1.0 - lr * wd : 1.0;
  const double l2 = cfg_.decoupled_weight_decay ? 0.0 : wd;
  for (size_t i = 0; i < params_.size(); ++i) {
    float* p = params_[i].param->data.data();
    const float* g = params_[i].grad->data.data();
    float* m = slots_[0][i].data.data();
    float* v = slots_[1][i].data.data();
    const size_t n = params_[i].param->data.size();
    for (size_t j = 0; j < n; ++j) {
      double pj = shrink * p[j];
      const double gj = static_cast<double>(g[j]) + l2 * p[j];
      const double mj = b1 * m[j] + (1.0 - b1) * gj;
      const double vj = b2 * v[j] + (1.0 - b2) * gj * gj;
      m[j] = static_cast<float>(mj);
      v[j] = static_cast<float>(vj);
      pj -= step_size * mj / (std::sqrt(vj) / sqrt_bc2 + eps);
      p[j] = static_cast<float>(pj);
    }
  }
}

// ---- clipping -------------------------------------------------------------------------------

double clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm) {
  MOE_REQUIRE(std::isfinite(max_norm) && max_norm > 0.0,
              "clip_grad_norm max_norm: must be finite and > 0, got ", max_norm);
  double sq = 0.0;
  for (size_t i = 0; i < grads.size(); ++i) {
    MOE_REQUIRE(grads[i] != nullptr, "clip_grad_norm: gradient ", i, " is null");
    for (float v : grads[i]->data) sq += static_cast<double>(v) * v;
  }
  const double norm = std::sqrt(sq);
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0)
    for (Tensor* g : grads)
      for (float& v : g->data) v = static_cast<float>(v * coef);
  return norm;
}

double clip_grad_norm(const std::vector<ParamRef>& params, double max_norm) {
  std::vector<Tensor*> grads;
  grads.reserve(params.size());
  for (const ParamRef& p : params) {
    MOE_REQUIRE(p.grad != nullptr, "clip_grad_norm: parameter '", p.name, "' has no gradient");
    grads.push_back(p.grad);
  }
  return clip_grad_norm(grads, max_norm);
}

}  // namespace moe
