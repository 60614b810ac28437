// MoEConfig <-> JSON: the "moe_config" entry of a checkpoint's metadata, and what the CLI
// reads and writes. Every field is written; reading is strict (an unknown field or a wrong
// type is an error naming the field), so a typo never silently means "default".
#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "common/check.hpp"
#include "moe/checkpoint.hpp"

namespace moe {

using detail::cat;
using ojson = nlohmann::ordered_json;

namespace {

// A float written as its shortest decimal ("0.01", not 0.009999999776): reads back to the
// same float and reads well in a header.
ojson float_json(float v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  MOE_ASSERT(r.ec == std::errc());
  return ojson::parse(std::string(buf, r.ptr));
}

int64_t get_int(const ojson& v, const char* name) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    MOE_REQUIRE(u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                "config ", name, ": too large, got ", u);
    return static_cast<int64_t>(u);
  }
  MOE_REQUIRE(v.is_number_integer(), "config ", name, ": expected a whole number, got ",
              v.dump());
  return v.get<int64_t>();
}

uint64_t get_uint(const ojson& v, const char* name) {
  MOE_REQUIRE(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0),
              "config ", name, ": expected a whole number >= 0, got ", v.dump());
  return v.get<uint64_t>();
}

double get_double(const ojson& v, const char* name) {
  MOE_REQUIRE(v.is_number(), "config ", name, ": expected a number, got ", v.dump());
  return v.get<double>();
}

float get_float(const ojson& v, const char* name) {
  const double d = get_double(v, name);
  MOE_REQUIRE(std::fabs(d) <= std::numeric_limits<float>::max(), "config ", name,
              ": out of float range, got ", v.dump());
  return static_cast<float>(d);
}

bool get_bool(const ojson& v, const char* name) {
  MOE_REQUIRE(v.is_boolean(), "config ", name, ": expected true or false, got ", v.dump());
  return v.get<bool>();
}

std::string get_string(const ojson& v, const char* name) {
  MOE_REQUIRE(v.is_string(), "config ", name, ": expected a string, got ", v.dump());
  return v.get<std::string>();
}

}  // namespace

std::string config_to_json(const MoEConfig& c) {
  ojson j;
  j["d_model"] = c.d_model;
  j["n_experts"] = c.n_experts;
  j["k"] = c.k;
  j["expert"] = to_string(c.expert);
  j["d_ff"] = c.d_ff;
  j["d_out"] = c.d_out;
  j["activation"] = to_string(c.activation);
  // The experts' b1/b2 switch is "bias", as moe.MoE's keyword (MoEConfig::expert_bias in
  // C++); files written before this name read "expert_bias", still accepted below.
  j["bias"] = c.expert_bias;
  j["swiglu_alpha"] = float_json(c.swiglu_alpha);
  j["swiglu_limit"] = float_json(c.swiglu_limit);
  j["capacity_factor"] = c.capacity_factor ? ojson(*c.capacity_factor) : ojson(nullptr);
  j["drop_policy"] = to_string(c.drop_policy);
  j["noise"] = to_string(c.noise);
  j["noise_scale"] = to_string(c.noise_scale);
  j["noise_stddev"] = float_json(c.noise_stddev);
  j["aux_alpha"] = float_json(c.aux_alpha);
  j["z_alpha"] = float_json(c.z_alpha);
  j["normalize_by_k"] = c.normalize_by_k;
  j["residual"] = c.residual;
  j["tie_break"] = to_string(c.tie_break);
  j["round_router_logits"] = c.round_router_logits;
  j["round_gate_weights"] = c.round_gate_weights;
  j["round_each_op"] = c.round_each_op;
  j["router_bias"] = c.router_bias;
  j["router_init_std"] = float_json(c.router_init_std);
  j["seed"] = c.seed;
  j["router"] = to_string(c.router_kind);
  j["renormalize"] = c.renormalize;
  j["scaling_factor"] = float_json(c.scaling_factor);
  j["aux_loss"] = to_string(c.aux_loss_kind);
  j["seq_len"] = c.seq_len;
  j["bias_update_rate"] = float_json(c.bias_update_rate);
  j["n_groups"] = c.n_groups;
  j["topk_groups"] = c.topk_groups;
  j["group_score"] = to_string(c.group_score);
  j["selection_bias"] = c.selection_bias;
  j["n_shared_experts"] = c.n_shared_experts;
  j["shared_d_ff"] = c.shared_d_ff;
  j["shared_gate"] = c.shared_gate;
  j["second_expert_policy"] = to_string(c.second_expert_policy);
  j["jitter"] = float_json(c.jitter);
  j["precision"] = to_string(c.precision);
  if (c.precision == Precision::int4) {  // only where they mean something
    j["int4_group"] = c.int4_group;
    j["int4_zero_points"] = c.int4_zero_points;
  }
  return j.dump();
}

MoEConfig config_from_json(const std::string& text) {
  ojson j;
  try {
    j = ojson::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat("config: not valid JSON (", e.what(), ")"));
  }
  MOE_REQUIRE(j.is_object(), "config: expected a JSON object, got ", j.type_name());
  MoEConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const ojson& v = *it;
    const char* k = key.c_str();
    if (key == "d_model") c.d_model = get_int(v, k);
    else if (key == "n_experts") c.n_experts = get_int(v, k);
    else if (key == "k") c.k = get_int(v, k);
    else if (key == "expert") c.expert = parse_expert_kind(get_string(v, k));
    else if (key == "d_ff") c.d_ff = get_int(v, k);
    else if (key == "d_out") c.d_out = get_int(v, k);
    else if (key == "activation") c.activation = parse_activation(get_string(v, k));
    else if (key == "bias" || key == "expert_bias") c.expert_bias = get_bool(v, k);
    else if (key == "swiglu_alpha") c.swiglu_alpha = get_float(v, k);
    else if (key == "swiglu_limit") c.swiglu_limit = get_float(v, k);
    else if (key == "capacity_factor")
      c.capacity_factor = v.is_null() ? std::nullopt : std::optional<double>(get_double(v, k));
    else if (key == "drop_policy") c.drop_policy = parse_drop_policy(get_string(v, k));
    else if (key == "noise") c.noise = parse_noise(get_string(v, k));
    else if (key == "noise_scale") c.noise_scale = parse_noise_scale(get_string(v, k));
    else if (key == "noise_stddev") c.noise_stddev = get_float(v, k);
    else if (key == "aux_alpha") c.aux_alpha = get_float(v, k);
    else if (key == "z_alpha") c.z_alpha = get_float(v, k);
    else if (key == "normalize_by_k") c.normalize_by_k = get_bool(v, k);
    else if (key == "residual") c.residual = get_bool(v, k);
    else if (key == "tie_break") c.tie_break = parse_tie_break(get_string(v, k));
    else if (key == "round_router_logits") c.round_router_logits = get_bool(v, k);
    else if (key == "round_gate_weights") c.round_gate_weights = get_bool(v, k);
    else if (key == "round_each_op") c.round_each_op = get_bool(v, k);
    else if (key == "router_bias") c.router_bias = get_bool(v, k);
    else if (key == "router_init_std") c.router_init_std = get_float(v, k);
    else if (key == "seed") c.seed = get_uint(v, k);
    else if (key == "router") c.router_kind = parse_router_kind(get_string(v, k));
    else if (key == "renormalize") c.renormalize = get_bool(v, k);
    else if (key == "scaling_factor") c.scaling_factor = get_float(v, k);
    else if (key == "aux_loss") c.aux_loss_kind = parse_aux_loss(get_string(v, k));
    else if (key == "seq_len") c.seq_len = get_int(v, k);
    else if (key == "bias_update_rate") c.bias_update_rate = get_float(v, k);
    else if (key == "n_groups") c.n_groups = get_int(v, k);
    else if (key == "topk_groups") c.topk_groups = get_int(v, k);
    else if (key == "group_score") c.group_score = parse_group_score(get_string(v, k));
    else if (key == "selection_bias") c.selection_bias = get_bool(v, k);
    else if (key == "n_shared_experts") c.n_shared_experts = get_int(v, k);
    else if (key == "shared_d_ff") c.shared_d_ff = get_int(v, k);
    else if (key == "shared_gate") c.shared_gate = get_bool(v, k);
    else if (key == "second_expert_policy")
      c.second_expert_policy = parse_second_expert_policy(get_string(v, k));
    else if (key == "jitter") c.jitter = get_float(v, k);
    else if (key == "precision") c.precision = parse_precision(get_string(v, k));
    else if (key == "int4_group") c.int4_group = get_int(v, k);
    else if (key == "int4_zero_points") c.int4_zero_points = get_bool(v, k);
    else throw Error(cat("config: unknown field '", key, "'"));
  }
  c.validate();
  return c;
}

}  // namespace moe
