// Layer checkpoints on top of the safetensors file: parameters by name, the config as JSON,
// optionally extra tensors and an optimizer's state. Loading checks everything before it
// changes anything.
#include <set>

#include "common/check.hpp"
#include "experts/int8.hpp"
#include "layer/init.hpp"
#include "moe/checkpoint.hpp"
#include "moe/optim.hpp"

namespace moe {

using detail::cat;

namespace {
constexpr const char* kConfigKey = "moe_config";
// The selection bias of bias_update_rate > 0 or selection_bias (state, not a parameter):
// saved only when it takes part in routing; a checkpoint without it loads as zeros.
constexpr const char* kExpertBiasKey = "expert_bias";

// precision int8: the expert matrices (E, K, N) are stored quantized, as I8 values and F32
// per-column scales "<name>.scale" (E, N) (experts/int8.hpp's quantization).
bool int8_matrix(const std::string& name) {
  return name == "W1" || name == "W2" || name == "W3" || name == "Ws1" || name == "Ws2" ||
         name == "Ws3";
}
std::string scale_name(const std::string& name) { return name + ".scale"; }

// q (E, K, N) holding the int8 values as floats, and scale (E, N), of W (E, K, N).
void quantize_matrix(Tensor& q, Tensor& scale, const Tensor& W) {
  MOE_ASSERT(W.shape.size() == 3);
  const int64_t E = W.shape[0], K = W.shape[1], N = W.shape[2];
  q = Tensor(W.shape);
  scale = Tensor({E, N});
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < N; ++j) {
      float amax = 0.0f;
      bool nan = false;
      for (int64_t k = 0; k < K; ++k) {
        const float v = W.data[(e * K + k) * N + j], a = std::fabs(v);
        amax = a > amax ? a : amax;
        nan = nan || v != v;
      }
      const float s = detail::int8_scale(amax, nan);
      scale.data[e * N + j] = s;
      for (int64_t k = 0; k < K; ++k)
        q.data[(e * K + k) * N + j] = detail::quantize_int8(W.data[(e * K + k) * N + j], s);
    }
}
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
  const bool int8 = layer.config().precision == Precision::int8;
  std::vector<std::pair<std::string, Tensor>> quantized;  // int8: name, q; name.scale, scale
  std::set<std::string> as_i8;
  // A layer without masters: its expert matrices from the form it holds (expert_matrix), in
  // the order of the parameters, so that the file is the one a layer with masters writes.
  std::vector<std::pair<std::string, Tensor>> held;
  std::vector<std::pair<std::string, const Tensor*>> params;
  if (layer.holds_masters()) {
    for (const std::string& name : layer.parameter_names())
      params.emplace_back(name, &layer.param(name));
  } else {
    const std::vector<detail::ParamSpec> specs = detail::parameter_specs(layer.config());
    held.reserve(specs.size());  // params points into it: no reallocation
    for (const auto& spec : specs) {
      if (!int8_matrix(spec.name)) {
        params.emplace_back(spec.name, &layer.param(spec.name));
        continue;
      }
      held.emplace_back(spec.name, layer.expert_matrix(spec.name));
      params.emplace_back(spec.name, &held.back().second);
    }
  }
  for (const auto& [name, W] : params) {
    if (!(int8 && int8_matrix(name))) {
      tensors.emplace_back(name, W);
      continue;
    }
    Tensor q, s;
    quantize_matrix(q, s, *W);
    quantized.emplace_back(name, std::move(q));
    quantized.emplace_back(scale_name(name), std::move(s));
    as_i8.insert(name);
  }
  // The I8 tensors last, so that every F32 tensor's data stays 4-byte aligned.
  for (const auto& [name, t] : quantized)
    if (!as_i8.count(name)) tensors.emplace_back(name, &t);
  for (const auto& [name, t] : quantized)
    if (as_i8.count(name)) tensors.emplace_back(name, &t);
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
  save_safetensors(path, tensors, meta, as_i8);
}

SafetensorsFile load_checkpoint(MoELayer& layer, const std::string& path, Optimizer* optimizer) {
  SafetensorsFile file = load_safetensors(path);
  const std::string what = cat("checkpoint '", path, "'");

  // The parameters, and for a layer without masters its expert matrices too (written through
  // set_expert_matrix into the form it holds).
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<bool> is_param;
  for (const auto& spec : detail::parameter_specs(layer.config())) {
    const bool param = layer.holds_masters() || !int8_matrix(spec.name);
    names.push_back(spec.name);
    shapes.push_back(spec.shape);
    is_param.push_back(param);
  }
  const Precision precision = layer.config().precision;
  std::vector<const Tensor*> found;
  std::vector<const Tensor*> scales;  // int8 matrices: their scales, else null
  for (size_t n = 0; n < names.size(); ++n) {
    const std::string& name = names[n];
    const std::vector<int64_t>& want = shapes[n];
    const NamedTensor* t = file.find(name);
    MOE_REQUIRE(t != nullptr, what, ": tensor '", name, "' is missing (the layer expects shape ",
                shape_str(want), ")");
    const bool i8 = t->dtype == "I8" && int8_matrix(name);
    MOE_REQUIRE(!i8 || precision == Precision::int8, what, ": tensor '", name,
                "' holds int8 weights (a checkpoint of precision 'int8'), but this layer has "
                "precision '", to_string(precision), "'; build the layer with precision 'int8' "
                "to load it");
    MOE_REQUIRE(i8 || t->dtype == "F32", what, ": tensor '", name, "' has dtype ", t->dtype,
                ", expected F32", int8_matrix(name) ? " (or I8 with precision 'int8')" : "");
    MOE_REQUIRE(t->tensor.shape == want, what, ": tensor '", name, "' has shape ",
                shape_str(t->tensor.shape), " in the file, but the layer expects ",
                shape_str(want));
    const Tensor* scale = nullptr;
    if (i8) {
      const NamedTensor* s = file.find(scale_name(name));
      const std::vector<int64_t> ws{want[0], want[2]};
      MOE_REQUIRE(s != nullptr, what, ": tensor '", scale_name(name), "' (the scales of the I8 '",
                  name, "') is missing");
      MOE_REQUIRE(s->dtype == "F32" && s->tensor.shape == ws, what, ": tensor '",
                  scale_name(name), "' must be F32 of shape ", shape_str(ws), ", got ", s->dtype,
                  " ", shape_str(s->tensor.shape));
      scale = &s->tensor;
    }
    found.push_back(&t->tensor);
    scales.push_back(scale);
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
  Tensor matrix;  // an expert matrix of a layer without masters, before set_expert_matrix
  for (size_t i = 0; i < names.size(); ++i) {
    Tensor& p = is_param[i] ? layer.param(names[i]) : matrix;
    p.shape = shapes[i];
    p.data = found[i]->data;
    if (scales[i]) {
      // int8: the weights become the dequantized q·scale, whose quantization gives back the
      // same q (the scales to within their last bit).
      const int64_t E = p.shape[0], K = p.shape[1], N = p.shape[2];
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < N; ++j)
            p.data[(e * K + k) * N + j] *= scales[i]->data[e * N + j];
    }
    if (is_param[i]) continue;
    const int64_t per_expert = shapes[i][1] * shapes[i][2];
    for (int64_t e = 0; e < shapes[i][0]; ++e)
      layer.set_expert_matrix(names[i], e, matrix.data.data() + e * per_expert);
  }
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
