#include "moe/layer.hpp"
#include "moe/optim.hpp"

namespace moe {

std::vector<ParamRef> layer_params(MoELayer& layer, const std::string& prefix) {
  std::vector<ParamRef> out;
  for (const std::string& name : layer.parameter_names())
    out.push_back({prefix + name, &layer.param(name), &layer.grad(name)});
  return out;
}

}  // namespace moe
