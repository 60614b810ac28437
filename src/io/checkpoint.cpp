// Layer checkpoints on top of the safetensors file: parameters by name, the config as JSON,
// optionally extra tensors and an optimizer's state. Loading checks everything before it
// changes anything.
#include "common/check.hpp"
#include "moe/checkpoint.hpp"
#include "moe/optim.hpp"

namespace moe {

using detail::cat;

namespace {
constexpr const char* kConfigKey = "moe_config";
// The selection bias of bias_update_rate > 0 or selection_bias (state, not a parameter):
// saved only when it takes part in routing; a checkpoint without it loads as zeros.
constexpr const char* kExpertBiasKey = "expert_bias";
}

void save_checkpoint(const MoELayer& layer, const std::string& path,
                     const std::map<std::string, std::string>& metadata) {
  CheckpointExtras extras;
  extras.metadata = metadata;
  save_checkpoint(layer, path, extras);
}

void save_checkpoint(const MoELayer& layer, const std::string& path,
                     const CheckpointExtras& extras) {
  std::vector<std::pair<std::string, const Tensor*>> tensors;
  for (const std::string& name : layer.parameter_names())
    tensors.emplace_back(name, &layer.param(name));
  if (layer.config().uses_selection_bias())
    tensors.emplace_back(kExpertBiasKey, &layer.expert_bias());
  tensors.insert(tensors.end(), extras.tensors.begin(), extras.tensors.end());

  std::map<std::string, std::string> meta = extras.metadata;
  MOE_REQUIRE(!meta.count(kConfigKey), "save_checkpoint('", path, "'): metadata key '",
              kConfigKey, "' is reserved for the layer's config");
  meta[kConfigKey] = config_to_json(layer.config());
  if (extras.optimizer) {
    const auto st = extras.optimizer->state_tensors();
    tensors.insert(tensors.end(), st.begin(), st.end());
    auto [key, value] = extras.optimizer->state_metadata();
    MOE_REQUIRE(!meta.count(key), "save_checkpoint('", path, "'): metadata key '", key,
                "' is reserved for the optimizer's state");
    meta[key] = value;
  }
  save_safetensors(path, tensors, meta);
}

SafetensorsFile load_checkpoint(MoELayer& layer, const std::string& path, Optimizer* optimizer) {
  SafetensorsFile file = load_safetensors(path);
  const std::string what = cat("checkpoint '", path, "'");

  const std::vector<std::string> names = layer.parameter_names();
  std::vector<const Tensor*> found;
  for (const std::string& name : names) {
    const Tensor& want = layer.param(name);
    const NamedTensor* t = file.find(name);
    MOE_REQUIRE(t != nullptr, what, ": tensor '", name, "' is missing (the layer expects shape ",
                shape_str(want.shape), ")");
    MOE_REQUIRE(t->dtype == "F32", what, ": tensor '", name, "' has dtype ", t->dtype,
                ", expected F32");
    MOE_REQUIRE(t->tensor.shape == want.shape, what, ": tensor '", name, "' has shape ",
                shape_str(t->tensor.shape), " in the file, but the layer expects ",
                shape_str(want.shape));
    found.push_back(&t->tensor);
  }
  const NamedTensor* bias = nullptr;
  if (layer.config().uses_selection_bias()) {
    bias = file.find(kExpertBiasKey);
    const std::vector<int64_t> want{layer.config().n_experts};
    MOE_REQUIRE(bias == nullptr || bias->tensor.shape == want, what, ": tensor '",
                kExpertBiasKey, "' has shape ", bias ? shape_str(bias->tensor.shape) : "",
                " in the file, but the layer expects ", shape_str(want));
  }
  if (optimizer) {
    try {
      optimizer->load_state(file);  // checks all before changing anything
    } catch (const Error& e) {
      throw Error(cat(what, ": ", e.what()));
    }
  }
  for (size_t i = 0; i < names.size(); ++i) layer.param(names[i]).data = found[i]->data;
  if (layer.config().uses_selection_bias()) {
    Tensor& b = layer.expert_bias();
    b = Tensor({layer.config().n_experts});
    if (bias) b.data = bias->tensor.data;
  }
  return file;
}

MoEConfig read_checkpoint_config(const std::string& path) {
  const SafetensorsFile file = load_safetensors(path);
  const auto it = file.metadata.find(kConfigKey);
  MOE_REQUIRE(it != file.metadata.end(), "checkpoint '", path,
              "': no __metadata__ entry 'moe_config' (not written by save_checkpoint?)");
  try {
    return config_from_json(it->second);
  } catch (const Error& e) {
    throw Error(cat("checkpoint '", path, "': moe_config: ", e.what()));
  }
}

}  // namespace moe
