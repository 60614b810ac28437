// Layer checkpoints on top of the safetensors file: parameters by name, the config as JSON,
// optionally extra tensors and an optimizer's state. Loading checks everything before it
// changes anything.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "common/check.hpp"
#include "experts/int8.hpp"
#include "experts/lowbit.hpp"
#include "layer/layer_access.hpp"
#include "quant/format.hpp"
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
// Low-bit precisions (int4, mxfp4, fp8): each expert matrix "<name>" (E, K, N) is stored as the
// bytes the layer holds (experts/lowbit.hpp, quant/quant_matrix.hpp's layout), per expert:
//   <name>.codes   U8  (E, N, C)  column j's codes (C = 16·⌈K/32⌉ for 4-bit codes, K for fp8)
//   <name>.scales  F32 (E, R, B)  (int4's fp16 and fp8's fp32, exactly) or U8 (mxfp4's E8M0);
//                                 R scale rows (N, or ⌈N/128⌉ for fp8), B blocks along K
//   <name>.zeros   U8  (E, N, B)  int4 with zero points
//   <name>.perm    F32 (E, K)     int4 in act-order (GPTQ): the kernel's K order
// and the metadata entry "moe_lowbit_layout" (JSON) gives each matrix's block_k, zero_points
// and act_order.
constexpr const char* kLowbitLayoutKey = "moe_lowbit_layout";

struct LowbitTensors {
  Tensor codes, scales, zeros, perm;
  int64_t block_k = 0;
  bool zero_points = false, act_order = false;
};

// The stored form of the E matrices (K, N) of `name`: the layer's own bytes without masters,
// else the masters quantized by the layer's quantizer (the bytes its next forward makes).
LowbitTensors lowbit_tensors(const MoELayer& layer, const std::string& name,
                             const std::vector<int64_t>& shape) {
  const MoEConfig& cfg = layer.config();
  const int64_t E = shape[0], K = shape[1], N = shape[2];
  std::vector<detail::QuantHeld> made;
  std::vector<const detail::QuantMatrix*> ms;
  if (layer.holds_masters()) {
    const Tensor& W = layer.param(name);
    const detail::Int4Options opt{cfg.int4_group, cfg.int4_zero_points, true};
    made.reserve(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
      made.push_back(detail::quantize_matrix(cfg.precision, opt, W.data.data() + e * K * N, K, N));
    for (const auto& h : made) ms.push_back(&h.m);
  } else {
    for (int64_t e = 0; e < E; ++e)
      ms.push_back(&detail::LayerAccess::expert_matrix_stored(layer, name, e));
  }
  // The file holds the column layout (quant_matrix.hpp): tiled matrices are written untiled.
  std::vector<detail::QuantStorage> untiled(static_cast<size_t>(E));
  std::vector<detail::QuantMatrix> columns(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    const detail::QuantMatrix*& m = ms[static_cast<size_t>(e)];
    if (!m->tiled) continue;
    columns[static_cast<size_t>(e)] = detail::quant_untiled(*m, 0, m->N, untiled[static_cast<size_t>(e)]);
    m = &columns[static_cast<size_t>(e)];
  }
  LowbitTensors t;
  const detail::QuantMatrix& m0 = *ms.front();
  t.block_k = m0.block_k;
  for (const auto* m : ms) {
    MOE_REQUIRE(m->block_k == t.block_k && m->zero_points == m0.zero_points, "save_checkpoint: '",
                name, "': its experts differ in block size or zero points (",
                "a checkpoint holds one layout per matrix)");
    t.zero_points = m0.zero_points;
    t.act_order = t.act_order || m->act_order;
  }
  const detail::QuantFormat& f = m0.fmt();
  const int64_t C = f.code_bits == 4 ? m0.sub_blocks() * 16 : K, R = m0.blocks_n(),
                B = m0.blocks_k();
  t.codes = Tensor({E, N, C});
  t.scales = Tensor({E, R, B});
  if (t.zero_points) t.zeros = Tensor({E, N, B});
  if (t.act_order) t.perm = Tensor({E, K});
  for (int64_t e = 0; e < E; ++e) {
    const detail::QuantMatrix& m = *ms[static_cast<size_t>(e)];
    for (int64_t j = 0; j < N; ++j)
      for (int64_t c = 0; c < C; ++c)
        t.codes.data[(e * N + j) * C + c] = m.codes[j * m.code_stride + c];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t b = 0; b < B; ++b)
        t.scales.data[(e * R + r) * B + b] =
            f.scale == detail::QuantScale::e8m0  // the byte itself (written as U8)
                ? static_cast<float>(
                      static_cast<const uint8_t*>(m.scales)[r * m.scale_stride + b])
                : detail::quant_scale_value(f.scale, m.scales, r * m.scale_stride + b);
    if (t.zero_points)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t b = 0; b < B; ++b)
          t.zeros.data[(e * N + j) * B + b] = m.zeros[j * m.zero_stride + b];
    if (t.act_order)
      for (int64_t k = 0; k < K; ++k)
        t.perm.data[e * K + k] = static_cast<float>(m.act_order ? m.perm[k] : k);
  }
  return t;
}
}

namespace {
// A low-bit matrix's tensors in a file, checked against the layer (shape, precision, layout).
struct LowbitFound {
  const Tensor *codes = nullptr, *scales = nullptr, *zeros = nullptr, *perm = nullptr;
  detail::QuantMatrix shape;  // format, K, N, block_k, zero_points, act_order (no pointers)
};

LowbitFound find_lowbit(const SafetensorsFile& file, const std::string& what,
                        const std::string& name, const std::vector<int64_t>& want,
                        Precision precision) {
  const auto meta_config = file.metadata.find(kConfigKey);
  std::string stored = "a low-bit precision";
  if (meta_config != file.metadata.end()) {
    try {
      stored = to_string(config_from_json(meta_config->second).precision);
    } catch (const Error&) {
    }
  }
  MOE_REQUIRE(low_bit(precision) && stored == to_string(precision), what, ": tensor '", name,
              ".codes' holds ", stored, " weights (a checkpoint of precision '", stored,
              "'), but this layer has precision '", to_string(precision),
              "'; build the layer with precision '", stored, "' to load it");
  const auto lay = file.metadata.find(kLowbitLayoutKey);
  MOE_REQUIRE(lay != file.metadata.end(), what, ": no __metadata__ entry '", kLowbitLayoutKey,
              "' (the layout of the low-bit tensors '", name, ".codes', ...)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(lay->second).at(name);
  } catch (const nlohmann::json::exception&) {
    throw Error(cat(what, ": __metadata__ '", kLowbitLayoutKey, "' has no valid entry for '",
                    name, "'"));
  }
  LowbitFound f;
  detail::QuantMatrix& m = f.shape;
  m.format = detail::quant_format_of(precision);
  m.K = want[1];
  m.N = want[2];
  try {
    m.block_k = j.at("block_k").get<int64_t>();
    m.zero_points = j.at("zero_points").get<bool>();
    m.act_order = j.at("act_order").get<bool>();
  } catch (const nlohmann::json::exception&) {
    throw Error(cat(what, ": __metadata__ '", kLowbitLayoutKey, "' entry of '", name,
                    "' needs block_k (integer), zero_points and act_order (booleans)"));
  }
  const detail::QuantFormat& fmt = m.fmt();
  MOE_REQUIRE((fmt.block_k == 0 ? (m.block_k == 32 || m.block_k == 64 || m.block_k == 128 ||
                                   (m.block_k > 0 && m.block_k % 128 == 0))
                                : m.block_k == fmt.block_k) &&
                  (!m.zero_points || fmt.zero_points) &&
                  (!m.act_order || m.format == detail::QuantFormatId::int4),
              what, ": '", name, "': layout block_k ", m.block_k, ", zero_points ",
              m.zero_points, ", act_order ", m.act_order, " is not one ", fmt.name, " has");
  const int64_t E = want[0], K = m.K, N = m.N;
  const int64_t C = fmt.code_bits == 4 ? m.sub_blocks() * 16 : K, R = m.blocks_n(),
                B = m.blocks_k();
  const auto need = [&](const std::string& t, const std::vector<int64_t>& shape,
                        const char* dtype) -> const Tensor* {
    const NamedTensor* nt = file.find(t);
    MOE_REQUIRE(nt != nullptr, what, ": tensor '", t, "' is missing (the layer expects ",
                dtype, " of shape ", shape_str(shape), ")");
    MOE_REQUIRE(nt->dtype == dtype && nt->tensor.shape == shape, what, ": tensor '", t,
                "' must be ", dtype, " of shape ", shape_str(shape), ", got ", nt->dtype, " ",
                shape_str(nt->tensor.shape));
    return &nt->tensor;
  };
  f.codes = need(name + ".codes", {E, N, C}, "U8");
  f.scales = need(name + ".scales", {E, R, B},
                  precision == Precision::mxfp4 ? "U8" : "F32");
  if (m.zero_points) f.zeros = need(name + ".zeros", {E, N, B}, "U8");
  if (m.act_order) f.perm = need(name + ".perm", {E, K}, "F32");
  return f;
}

// Expert matrix `name` from its low-bit tensors: a layer without masters takes the bytes as
// they are; a layer with masters takes their values (its quantizer makes its bytes from them).
void set_lowbit(MoELayer& layer, const std::string& name, const std::vector<int64_t>& shape,
                const LowbitFound& f, bool masters) {
  const int64_t E = shape[0], K = shape[1], N = shape[2];
  detail::QuantMatrix m = f.shape;
  const detail::QuantFormat& fmt = m.fmt();
  const int64_t C = fmt.code_bits == 4 ? m.sub_blocks() * 16 : K, R = m.blocks_n(),
                B = m.blocks_k();
  std::vector<uint8_t> codes(static_cast<size_t>(N * C)), zeros;
  std::vector<uint8_t> scales(static_cast<size_t>(R * B * 4));
  std::vector<int32_t> perm;
  std::vector<double> values;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < N * C; ++i)
      codes[static_cast<size_t>(i)] = static_cast<uint8_t>(f.codes->data[e * N * C + i]);
    for (int64_t i = 0; i < R * B; ++i) {
      const float v = f.scales->data[e * R * B + i];
      switch (fmt.scale) {
        case detail::QuantScale::f16: {
          const uint16_t h = detail::f32_to_f16(v);
          MOE_REQUIRE(detail::f16_to_f32(h) == v || v != v, "checkpoint: '", name,
                      ".scales' of expert ", e, " holds ", v, " at ", i,
                      ", not an fp16 value (int4 scales are fp16)");
          std::memcpy(scales.data() + 2 * i, &h, 2);
          break;
        }
        case detail::QuantScale::e8m0: scales[static_cast<size_t>(i)] = static_cast<uint8_t>(v); break;
        case detail::QuantScale::f32: std::memcpy(scales.data() + 4 * i, &v, 4); break;
      }
    }
    if (m.zero_points) {
      zeros.resize(static_cast<size_t>(N * B));
      for (int64_t i = 0; i < N * B; ++i) {
        const float z = f.zeros->data[e * N * B + i];
        MOE_REQUIRE(z <= 15.0f, "checkpoint: '", name, ".zeros' of expert ", e, " holds ", z,
                    " at ", i, " (int4 zero points are 0..15)");
        zeros[static_cast<size_t>(i)] = static_cast<uint8_t>(z);
      }
    }
    if (m.act_order) {
      perm.resize(static_cast<size_t>(K));
      std::vector<char> seen(static_cast<size_t>(K), 0);
      for (int64_t k = 0; k < K; ++k) {
        const float r = f.perm->data[e * K + k];
        MOE_REQUIRE(r >= 0.0f && r < static_cast<float>(K) && r == std::nearbyint(r) &&
                        !seen[static_cast<size_t>(r)],
                    "checkpoint: '", name, ".perm' of expert ", e,
                    " is not a permutation of 0..", K - 1, " (", r, " at ", k, ")");
        seen[static_cast<size_t>(r)] = 1;
        perm[static_cast<size_t>(k)] = static_cast<int32_t>(r);
      }
    }
    m.codes = codes.data();
    m.code_stride = C;
    m.scales = scales.data();
    m.scale_stride = B;
    m.zeros = m.zero_points ? zeros.data() : nullptr;
    m.zero_stride = m.zero_points ? B : 0;
    m.perm = m.act_order ? perm.data() : nullptr;
    if (masters) {  // the values as masters (param() marks the copies stale) ...
      detail::validate(m);
      values.resize(static_cast<size_t>(K * N));
      detail::quant_dequant_ref(m, values.data());
      Tensor& W = layer.param(name);
      for (int64_t i = 0; i < K * N; ++i)
        W.data[e * K * N + i] = static_cast<float>(values[static_cast<size_t>(i)]);
    }
    // ... and the bytes as the copies (load_checkpoint marks them current at its end).
    detail::LayerAccess::set_expert_matrix_stored(layer, name, e, m);
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
      if (low_bit(layer.config().precision)) {  // written from its bytes: the shape only
        Tensor shape_only;
        shape_only.shape = spec.shape;
        held.emplace_back(spec.name, std::move(shape_only));
      } else {
        held.emplace_back(spec.name, layer.expert_matrix(spec.name));
      }
      params.emplace_back(spec.name, &held.back().second);
    }
  }
  const bool lowbit = low_bit(layer.config().precision);
  std::set<std::string> as_u8;
  nlohmann::json layout = nlohmann::json::object();
  for (const auto& [name, W] : params) {
    if (lowbit && int8_matrix(name)) {
      LowbitTensors t = lowbit_tensors(layer, name, W->shape);
      layout[name] = {{"block_k", t.block_k},
                      {"zero_points", t.zero_points},
                      {"act_order", t.act_order}};
      const bool e8m0 = layer.config().precision == Precision::mxfp4;
      quantized.emplace_back(name + ".codes", std::move(t.codes));
      as_u8.insert(name + ".codes");
      quantized.emplace_back(name + ".scales", std::move(t.scales));
      if (e8m0) as_u8.insert(name + ".scales");
      if (t.zero_points) {
        quantized.emplace_back(name + ".zeros", std::move(t.zeros));
        as_u8.insert(name + ".zeros");
      }
      if (t.act_order) quantized.emplace_back(name + ".perm", std::move(t.perm));
      continue;
    }
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
  // The I8 and U8 tensors last, so that every F32 tensor's data stays 4-byte aligned.
  for (const auto& [name, t] : quantized)
    if (!as_i8.count(name) && !as_u8.count(name)) tensors.emplace_back(name, &t);
  for (const auto& [name, t] : quantized)
    if (as_i8.count(name) || as_u8.count(name)) tensors.emplace_back(name, &t);
  if (layer.config().uses_selection_bias())
    tensors.emplace_back(kExpertBiasKey, &layer.expert_bias());
  tensors.insert(tensors.end(), extras.tensors.begin(), extras.tensors.end());

  std::map<std::string, std::string> meta = extras.metadata;
  MOE_REQUIRE(!meta.count(kConfigKey), "save_checkpoint('", path, "'): metadata key '",
              kConfigKey, "' is reserved for the layer's config");
  meta[kConfigKey] = config_to_json(layer.config());
  MOE_REQUIRE(!meta.count(kLowbitLayoutKey), "save_checkpoint('", path, "'): metadata key '",
              kLowbitLayoutKey, "' is reserved for the layout of low-bit weights");
  if (lowbit) meta[kLowbitLayoutKey] = layout.dump();
  if (extras.optimizer) {
    const auto st = extras.optimizer->state_tensors();
    tensors.insert(tensors.end(), st.begin(), st.end());
    auto [key, value] = extras.optimizer->state_metadata();
    MOE_REQUIRE(!meta.count(key), "save_checkpoint('", path, "'): metadata key '", key,
                "' is reserved for the optimizer's state");
    meta[key] = value;
  }
  save_safetensors(path, tensors, meta, as_i8, as_u8);
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
  std::vector<LowbitFound> lowbit(names.size());  // low-bit matrices: their tensors
  for (size_t n = 0; n < names.size(); ++n) {
    const std::string& name = names[n];
    const std::vector<int64_t>& want = shapes[n];
    if (int8_matrix(name) && file.find(name + ".codes")) {
      lowbit[n] = find_lowbit(file, what, name, want, precision);
      found.push_back(nullptr);
      scales.push_back(nullptr);
      continue;
    }
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
    if (lowbit[i].codes) {
      set_lowbit(layer, names[i], shapes[i], lowbit[i], is_param[i]);
      continue;
    }
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
  // A low-bit layer with masters: its copies are the file's bytes (the masters their values),
  // not made again from the masters by its quantizer.
  if (layer.holds_masters() &&
      std::any_of(lowbit.begin(), lowbit.end(), [](const LowbitFound& f) { return f.codes; }))
    detail::LayerAccess::stored_copies_current(layer);
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
