// Pretrained MoE blocks (include/moe/pretrained.hpp, docs/models.md). The families are rows
// of one table: where the block lives in the checkpoint, its tensor names in the published
// per-expert layout and in transformers' stacked layout, and how config.json maps onto
// MoEConfig. The loader itself is generic: it resolves a block into a list of stored weights
// and how each becomes one of the layer's matrices, then converts them one at a time.
#include "moe/pretrained.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <set>

#include <omp.h>

#include "common/check.hpp"
#include "io/pretrained_folder.hpp"
#include "layer/layer_access.hpp"

namespace moe {

using detail::cat;
using detail::MatrixMap;
using detail::PretrainedFolder;
using detail::StoredQuant;
using detail::StoredWeight;
using json = nlohmann::ordered_json;

namespace {

// ---- config.json ---------------------------------------------------------------------------

// Typed reads of config.json with errors naming the key. A key read with a default is one
// that transformers' config class also defaults; the others are required.
struct ConfigReader {
  const json& j;
  std::string what;    // "config.json of '<dir>'"
  std::string family;

  const json* find(std::initializer_list<const char*> keys, std::string* found = nullptr) const {
    for (const char* k : keys) {
      auto it = j.find(k);
      if (it != j.end() && !it->is_null()) {
        if (found) *found = k;
        return &*it;
      }
    }
    return nullptr;
  }
  static std::string alternatives(std::initializer_list<const char*> keys) {
    std::string s;
    for (const char* k : keys) s += (s.empty() ? "'" : "' (or '") + std::string(k);
    s += "'";
    for (size_t i = 1; i < keys.size(); ++i) s += ")";
    return s;
  }
  int64_t as_int(const json& v, const std::string& key) const {
    MOE_REQUIRE(v.is_number_integer() || v.is_number_unsigned(), what, ": key '", key,
                "' must be an integer, got ", v.dump());
    MOE_REQUIRE(!v.is_number_unsigned() ||
                    v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                what, ": key '", key, "' is too large");
    return v.get<int64_t>();
  }
  int64_t integer(std::initializer_list<const char*> keys) const {
    std::string key;
    const json* v = find(keys, &key);
    MOE_REQUIRE(v != nullptr, what, ": missing key ", alternatives(keys), ", which ", family,
                " needs");
    return as_int(*v, key);
  }
  int64_t integer_or(const char* key, int64_t def) const {
    const json* v = find({key});
    return v ? as_int(*v, key) : def;
  }
  double number_or(const char* key, double def) const {
    const json* v = find({key});
    if (!v) return def;
    MOE_REQUIRE(v->is_number(), what, ": key '", key, "' must be a number, got ", v->dump());
    return v->get<double>();
  }
  bool boolean_or(const char* key, bool def) const {
    const json* v = find({key});
    if (!v) return def;
    MOE_REQUIRE(v->is_boolean(), what, ": key '", key, "' must be true or false, got ",
                v->dump());
    return v->get<bool>();
  }
  std::string string_or(const char* key, const std::string& def) const {
    const json* v = find({key});
    if (!v) return def;
    MOE_REQUIRE(v->is_string(), what, ": key '", key, "' must be a string, got ", v->dump());
    return v->get<std::string>();
  }
  std::vector<int64_t> int_list(const char* key) const {
    const json* v = find({key});
    std::vector<int64_t> out;
    if (!v) return out;
    MOE_REQUIRE(v->is_array(), what, ": key '", key, "' must be a list of integers, got ",
                v->dump());
    for (const json& x : *v) out.push_back(as_int(x, key));
    return out;
  }
  void require_silu(const char* key = "hidden_act") const {
    const std::string act = string_or(key, "silu");
    MOE_REQUIRE(act == "silu" || act == "swish", what, ": '", key, "' is '", act, "'; the ",
                family, " experts libmoe builds are SwiGLU (silu)");
  }
};

// ---- families ------------------------------------------------------------------------------

enum class StackLayout {
  halves_out_major,      // gate_up (E, 2F, d): gate rows [0, F), up rows [F, 2F); down (E, d, F)
  interleaved_in_major,  // gate_up (E, d, 2F): gate columns even, up odd; down (E, F, d)
};

// A family's block resolved from config.json: the library's config and the tensor names.
struct BlockSpec {
  MoEConfig cfg;
  int64_t n_layers = 0;
  std::vector<int64_t> moe_layers;
  std::string dense_rule;            // why the other layers are dense, for errors
  std::string router;                // in words
  bool router_bias = false;          // "<router>.bias"
  bool selection_bias = false;       // "<router>.e_score_correction_bias"
  bool expert_biases = false;        // gpt_oss: gate_up_proj_bias, down_proj_bias
  StoredQuant quant;                 // config.json's quantization_config
};

struct Family {
  const char* model_type;
  const char* blocks;        // the block's module names, comma-separated, first found wins
  const char* routers;       // the router's linear under the block, comma-separated
  const char* experts;       // per-expert "gate,up,down" projections under experts.N ("" none)
  const char* stacks;        // stacked "gate_up,down" pairs under the block, ';'-separated
  StackLayout layout;
  const char* shared;        // the shared expert's MLP under the block ("" none)
  const char* shared_gate;   // its gate's linear under the block ("" none)
  void (*configure)(const ConfigReader& c, BlockSpec& b);
};

// num_hidden_layers, bounded before the layer lists are built from it.
int64_t num_layers(const ConfigReader& c) {
  constexpr int64_t kMaxLayers = 1 << 16;
  const int64_t n = c.integer({"num_hidden_layers"});
  MOE_REQUIRE(n >= 1 && n <= kMaxLayers, c.what, ": 'num_hidden_layers' must be in 1..",
              kMaxLayers, ", got ", n);
  return n;
}

void all_layers(const ConfigReader& c, BlockSpec& b) {
  b.n_layers = num_layers(c);
  for (int64_t l = 0; l < b.n_layers; ++l) b.moe_layers.push_back(l);
}

void common_shape(const ConfigReader& c, BlockSpec& b,
                  std::initializer_list<const char*> experts_keys,
                  std::initializer_list<const char*> ff_keys) {
  MoEConfig& m = b.cfg;
  m.d_model = c.integer({"hidden_size"});
  m.n_experts = c.integer(experts_keys);
  m.k = c.integer({"num_experts_per_tok", "experts_per_token"});
  m.d_ff = c.integer(ff_keys);
  m.expert = ExpertKind::swiglu;
  m.expert_bias = false;
  MOE_REQUIRE(m.d_model >= 1 && m.n_experts >= 1 && m.d_ff >= 1, c.what,
              ": hidden_size, the number of experts and the experts' width must be >= 1");
}

std::string topk_words(const MoEConfig& m) {
  return cat("top-", m.k, " of ", m.n_experts);
}

void configure_mixtral(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_local_experts", "num_experts"}, {"intermediate_size"});
  c.require_silu();
  all_layers(c, b);
  b.cfg.router_kind = RouterKind::softmax_topk;
  b.cfg.renormalize = true;
  b.router = cat("softmax over all experts, ", topk_words(b.cfg), ", renormalised");
}

// Qwen2-MoE / Qwen3-MoE: MoE unless in mlp_only_layers or off the decoder_sparse_step.
void qwen_layers(const ConfigReader& c, BlockSpec& b) {
  b.n_layers = num_layers(c);
  const std::vector<int64_t> listed = c.int_list("mlp_only_layers");
  const std::set<int64_t> mlp_only(listed.begin(), listed.end());
  const int64_t step = c.integer_or("decoder_sparse_step", 1);
  MOE_REQUIRE(step >= 1, c.what, ": 'decoder_sparse_step' must be >= 1, got ", step);
  for (int64_t l = 0; l < b.n_layers; ++l)
    if (mlp_only.count(l) == 0 && (l + 1) % step == 0)
      b.moe_layers.push_back(l);
  b.dense_rule = cat("mlp_only_layers and decoder_sparse_step = ", step);
}

void softmax_norm(const ConfigReader& c, BlockSpec& b) {
  b.cfg.router_kind = RouterKind::softmax_topk;
  b.cfg.renormalize = c.boolean_or("norm_topk_prob", false);
  b.router = cat("softmax over all experts, ", topk_words(b.cfg),
                 b.cfg.renormalize ? ", renormalised" : ", not renormalised");
}

void configure_qwen2_moe(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_experts", "num_local_experts"}, {"moe_intermediate_size"});
  c.require_silu();
  qwen_layers(c, b);
  softmax_norm(c, b);
  b.cfg.n_shared_experts = 1;
  b.cfg.shared_d_ff = c.integer({"shared_expert_intermediate_size"});
  MOE_REQUIRE(b.cfg.shared_d_ff >= 1, c.what, ": 'shared_expert_intermediate_size' must be >= 1, ",
              "got ", b.cfg.shared_d_ff);
  b.cfg.shared_gate = true;
}

void configure_qwen3_moe(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_experts", "num_local_experts"}, {"moe_intermediate_size"});
  c.require_silu();
  qwen_layers(c, b);
  softmax_norm(c, b);
}

void configure_olmoe(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_experts", "num_local_experts"}, {"intermediate_size"});
  c.require_silu();
  all_layers(c, b);
  softmax_norm(c, b);
}

void configure_granitemoe(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_local_experts", "num_experts"}, {"intermediate_size"});
  c.require_silu();
  all_layers(c, b);
  b.cfg.router_kind = RouterKind::topk_softmax;
  b.router = cat(topk_words(b.cfg), " of the logits, then softmax over the k");
}

// DeepSeek: dense below first_k_dense_replace; n_shared_experts shared experts of
// moe_intermediate_size each, stored (and held) as one MLP of their summed width.
void deepseek_common(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"n_routed_experts", "num_local_experts", "num_experts"},
               {"moe_intermediate_size"});
  c.require_silu();
  MOE_REQUIRE(!c.boolean_or("mlp_bias", false), c.what,
              ": 'mlp_bias' is true; DeepSeek experts with biases are not supported");
  b.n_layers = num_layers(c);
  const int64_t first = c.integer_or("first_k_dense_replace", 0);
  for (int64_t l = std::max<int64_t>(first, 0); l < b.n_layers; ++l) b.moe_layers.push_back(l);
  b.dense_rule = cat("first_k_dense_replace = ", first);
  const int64_t shared = c.integer_or("n_shared_experts", 0);
  MOE_REQUIRE(shared >= 0, c.what, ": 'n_shared_experts' must be >= 0, got ", shared);
  if (shared > 0) {
    b.cfg.n_shared_experts = 1;
    b.cfg.shared_d_ff = shared * b.cfg.d_ff;
  }
  b.cfg.scaling_factor = static_cast<float>(c.number_or("routed_scaling_factor", 1.0));
}

void deepseek_groups(const ConfigReader& c, BlockSpec& b, int64_t def_groups, int64_t def_topk) {
  b.cfg.n_groups = c.integer_or("n_group", def_groups);
  b.cfg.topk_groups = c.integer_or("topk_group", def_topk);
  MOE_REQUIRE(b.cfg.n_groups >= 1 && b.cfg.n_experts % b.cfg.n_groups == 0, c.what,
              ": 'n_group' (", b.cfg.n_groups, ") must divide the ", b.cfg.n_experts, " experts");
}

void configure_deepseek_v2(const ConfigReader& c, BlockSpec& b) {
  deepseek_common(c, b);
  // transformers 5.24 never renormalises DeepSeek-V2's weights (norm_topk_prob is unused).
  b.cfg.router_kind = RouterKind::softmax_topk;
  const std::string method = c.string_or("topk_method", "greedy");
  if (method == "group_limited_greedy") {
    deepseek_groups(c, b, 1, 1);
    b.cfg.group_score = GroupScore::max;
  } else {
    MOE_REQUIRE(method == "greedy", c.what, ": 'topk_method' is '", method,
                "' (expected greedy or group_limited_greedy)");
  }
  b.router = cat("softmax over all experts, ", topk_words(b.cfg),
                 b.cfg.n_groups > 1 ? cat(" within the best ", b.cfg.topk_groups, " of ",
                                          b.cfg.n_groups, " groups (a group scores its max)")
                                    : std::string(),
                 ", not renormalised, x ", b.cfg.scaling_factor);
}

void configure_deepseek_v3(const ConfigReader& c, BlockSpec& b) {
  deepseek_common(c, b);
  b.cfg.router_kind = RouterKind::sigmoid;
  b.cfg.renormalize = c.boolean_or("norm_topk_prob", true);
  deepseek_groups(c, b, 8, 4);
  b.cfg.group_score = GroupScore::top2_sum;
  b.cfg.selection_bias = true;
  b.selection_bias = true;
  b.router = cat("sigmoid scores, ", topk_words(b.cfg), " by score + e_score_correction_bias",
                 b.cfg.n_groups > 1 ? cat(" within the best ", b.cfg.topk_groups, " of ",
                                          b.cfg.n_groups, " groups (a group scores its top-2 sum)")
                                    : std::string(),
                 b.cfg.renormalize ? ", renormalised" : "", ", x ", b.cfg.scaling_factor);
}

void configure_gpt_oss(const ConfigReader& c, BlockSpec& b) {
  common_shape(c, b, {"num_local_experts", "num_experts"}, {"intermediate_size"});
  all_layers(c, b);
  b.cfg.expert = ExpertKind::clamped_swiglu;
  b.cfg.expert_bias = true;
  b.expert_biases = true;
  b.cfg.swiglu_alpha = static_cast<float>(c.number_or("swiglu_alpha", 1.702));
  b.cfg.swiglu_limit = static_cast<float>(c.number_or("swiglu_limit", 7.0));
  b.cfg.router_kind = RouterKind::topk_softmax;
  b.cfg.router_bias = true;
  b.router_bias = true;
  b.router = cat(topk_words(b.cfg), " of the logits (router with a bias), then softmax over the k");
}

// quantize_config.json beside config.json: its object (null: none) and how errors name it.
struct QuantizeFile {
  const json* j = nullptr;
  std::string what;  // "quantize_config.json of '<dir>'"
};

// The quantization settings object `q` (any family): which stored format the weights claim,
// and for GPTQ / AWQ the keys the repacking needs, each checked. Errors name `w` (the file)
// and the key as `p` + key: config.json's quantization_config (p = "quantization_config.") or
// quantize_config.json's top level (p = "", quant_method absent meaning gptq).
void read_quant_settings(const json& q, const std::string& w, const std::string& p,
                         const std::string& family, StoredQuant& s) {
  ConfigReader r{q, w, family};
  const auto key = [&p](const std::string& k) { return p + k; };
  const json* m = r.find({"quant_method"});
  if (m) {
    MOE_REQUIRE(m->is_string(), w, ": key '", key("quant_method"), "' must be a string, got ",
                m->dump());
    s.method_name = m->get<std::string>();
    std::string lower = s.method_name;
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    if (lower == "gptq") s.method = StoredQuant::Method::gptq;
    else if (lower == "awq") s.method = StoredQuant::Method::awq;
    else if (lower == "fp8") s.method = StoredQuant::Method::fp8;
    else if (lower == "mxfp4") s.method = StoredQuant::Method::mxfp4;
    else
      throw Error(cat(w, ": ", key("quant_method"), " is '", s.method_name,
                      "'; libmoe reads gptq, awq, fp8 and mxfp4 checkpoints"));
  }
  // Integers and booleans of the object, under their full name in errors.
  const auto integer_or = [&](std::initializer_list<const char*> keys, int64_t def) {
    std::string found;
    const json* v = r.find(keys, &found);
    return v ? r.as_int(*v, key(found)) : def;
  };
  const auto boolean_or = [&](const char* k, bool def) {
    const json* v = r.find({k});
    if (!v) return def;
    MOE_REQUIRE(v->is_boolean(), w, ": key '", key(k), "' must be true or false, got ", v->dump());
    return v->get<bool>();
  };
  const auto string_or = [&](const char* k, const std::string& def) {
    const json* v = r.find({k});
    if (!v) return def;
    MOE_REQUIRE(v->is_string(), w, ": key '", key(k), "' must be a string, got ", v->dump());
    return v->get<std::string>();
  };
  // modules_to_not_convert: modules kept unquantized (any method).
  if (const json* n = r.find({"modules_to_not_convert"})) {
    MOE_REQUIRE(n->is_array(), w, ": key '", key("modules_to_not_convert"), "' must be a ",
                "list of module names, got ", n->dump());
    for (const json& x : *n) {
      MOE_REQUIRE(x.is_string(), w, ": key '", key("modules_to_not_convert"), "' must ",
                  "be a list of module names, got ", x.dump());
      StoredQuant::Pattern pat;
      pat.key = x.get<std::string>();
      MOE_REQUIRE(pat.key.size() <= 512, w, ": key '", key("modules_to_not_convert"), "' ",
                  "must be a list of module names or patterns, got one longer than 512 characters");
      try {
        pat.re = std::regex(pat.key, std::regex::ECMAScript);
      } catch (const std::regex_error&) {
        throw Error(cat(w, ": key '", key("modules_to_not_convert"), "' must be a list ",
                        "of module names or patterns, got '", pat.key, "' (not a regular expression)"));
      }
      s.not_converted.push_back(std::move(pat));
    }
  }
  if (s.method == StoredQuant::Method::fp8 || s.method == StoredQuant::Method::none) {
    auto bs = q.find("weight_block_size");
    if (bs != q.end() && !bs->is_null()) {
      MOE_REQUIRE(bs->is_array() && bs->size() == 2, w, ": ", key("weight_block_size"),
                  " must be [rows, cols], got ", bs->dump());
      for (int i = 0; i < 2; ++i) {
        s.fp8_block[i] = r.as_int((*bs)[i], key("weight_block_size"));
        MOE_REQUIRE(s.fp8_block[i] >= 1, w, ": ", key("weight_block_size"),
                    " entries must be >= 1");
      }
    }
    const std::string fmt = string_or("fmt", "e4m3");
    MOE_REQUIRE(fmt == "e4m3", w, ": ", key("fmt"), " is '", fmt,
                "'; libmoe reads e4m3 (F8_E4M3) weights");
    return;
  }
  if (!s.int4()) return;
  const bool gptq = s.method == StoredQuant::Method::gptq;
  std::string bits_key;
  const json* bits = r.find({"bits", "w_bit"}, &bits_key);
  MOE_REQUIRE(bits != nullptr, w, ": missing key '", key("bits"), "', which ", s.method_name,
              " needs");
  const int64_t nbits = r.as_int(*bits, key(bits_key));
  MOE_REQUIRE(nbits == 4, w, ": ", key(bits_key), " is ", nbits,
              "; libmoe reads 4-bit GPTQ and AWQ checkpoints only");
  // A group size: a multiple of 32 (the kernel's sub-block), or -1 for GPTQ (one group).
  const auto check_group = [&](int64_t g, const std::string& k) {
    MOE_REQUIRE((g > 0 && g % 32 == 0) || (gptq && g == -1), w, ": ", k, " is ", g,
                "; it must be a positive multiple of 32", gptq ? " (or -1: one group)" : "");
  };
  std::string group_key = "group_size";
  if (!r.find({"group_size"}) && r.find({"q_group_size"})) group_key = "q_group_size";
  MOE_REQUIRE(r.find({"group_size", "q_group_size"}) != nullptr, w, ": missing key '",
              key("group_size"), "', which ", s.method_name, " needs");
  s.group = integer_or({"group_size", "q_group_size"}, 128);
  check_group(s.group, key(group_key));
  if (gptq) {
    s.sym = boolean_or("sym", true);
    s.desc_act = boolean_or("desc_act", false);
    MOE_REQUIRE(!boolean_or("is_marlin_format", false), w, ": ", key("is_marlin_format"),
                " is true; libmoe reads GPTQ's own layout");
    const std::string fmt = string_or("checkpoint_format", "gptq");
    MOE_REQUIRE(fmt == "gptq" || fmt == "gptq_v2", w, ": ", key("checkpoint_format"), " is '",
                fmt, "'; libmoe reads 'gptq' (v1: zero points stored minus 1) and 'gptq_v2'");
    s.zeros_minus_one = fmt == "gptq";
    if (const json* dyn = r.find({"dynamic"})) {
      MOE_REQUIRE(dyn->is_object(), w, ": key '", key("dynamic"), "' must be an object, got ",
                  dyn->dump());
      for (auto it = dyn->begin(); it != dyn->end(); ++it) {
        const std::string k = it.key();
        const std::string dk = cat(key("dynamic"), "['", k, "']");
        StoredQuant::Rule rule;
        rule.key = k;
        std::string pattern = k;
        if (k.rfind("-:", 0) == 0) {
          rule.skip = true;
          pattern = k.substr(2);
        } else if (k.rfind("+:", 0) == 0) {
          pattern = k.substr(2);
        }
        MOE_REQUIRE(pattern.size() <= 512, w, ": ", dk, ": the pattern is longer than 512 characters");
        try {
          rule.re = std::regex(pattern, std::regex::ECMAScript);
        } catch (const std::regex_error&) {
          throw Error(cat(w, ": ", dk, " is not a regular expression"));
        }
        if (!rule.skip) {
          MOE_REQUIRE(it->is_object(), w, ": ", dk, " must be an object of overrides, got ",
                      it->dump());
          if (auto b2 = it->find("bits"); b2 != it->end()) {
            const int64_t v = r.as_int(*b2, dk + ".bits");
            MOE_REQUIRE(v == 4, w, ": ", dk, ".bits is ", v,
                        "; libmoe reads 4-bit GPTQ and AWQ checkpoints only");
          }
          if (auto g2 = it->find("group_size"); g2 != it->end()) {
            rule.group = r.as_int(*g2, dk + ".group_size");
            check_group(rule.group, dk + ".group_size");
          }
        }
        s.dynamic.push_back(std::move(rule));
      }
    }
  } else {
    std::string version = string_or("version", "gemm");
    std::transform(version.begin(), version.end(), version.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    MOE_REQUIRE(version == "gemm", w, ": ", key("version"), " is '",
                string_or("version", "gemm"), "'; libmoe reads AWQ's 'gemm' layout only");
    MOE_REQUIRE(boolean_or("zero_point", true), w, ": ", key("zero_point"), " is false; ",
                "libmoe reads AWQ checkpoints with zero points (qzeros)");
  }
}

// quantize_config.json's other AutoGPTQ keys, unused here, are still checked for their type:
// a file that is not what it claims to be is refused, naming the key.
void check_quantize_file(const QuantizeFile& qf, const std::string& family) {
  const ConfigReader r{*qf.j, qf.what, family};
  for (const char* k : {"bits", "group_size"})
    if (const json* v = r.find({k})) r.as_int(*v, k);
  for (const char* k : {"sym", "desc_act", "true_sequential"}) r.boolean_or(k, false);
  for (const char* k : {"quant_method", "checkpoint_format", "model_file_base_name"})
    r.string_or(k, "");
}

// config.json's quantization_config `q` is the one read (as transformers reads it); a
// quantize_config.json beside it must not contradict it on what decides the values.
void check_files_agree(const json& q, const ConfigReader& c, const QuantizeFile& qf) {
  const ConfigReader a{q, c.what, c.family}, b{*qf.j, qf.what, c.family};
  const auto differ = [&](const std::string& k, const std::string& x, const char* k2,
                          const std::string& y) {
    throw Error(cat(c.what, ": quantization_config.", k, " is ", x, ", but ", qf.what, " has ",
                    k2, " = ", y, "; the two files must agree"));
  };
  const auto integers = [&](std::initializer_list<const char*> keys) {
    std::string found;
    const json* x = a.find(keys, &found);
    const char* k2 = *keys.begin();
    const json* y = b.find({k2});
    if (!x || !y) return;  // a missing key is the reader's error, or a default not compared
    const int64_t vx = a.as_int(*x, "quantization_config." + found), vy = b.as_int(*y, k2);
    if (vx != vy) differ(found, cat(vx), k2, cat(vy));
  };
  integers({"bits", "w_bit"});
  integers({"group_size", "q_group_size"});
  for (const auto& [k, def] : {std::pair<const char*, bool>{"sym", true}, {"desc_act", false}}) {
    const json* x = a.find({k});
    MOE_REQUIRE(!x || x->is_boolean(), c.what, ": key 'quantization_config.", k,
                "' must be true or false, got ", x ? x->dump() : "");
    const bool vx = x ? x->get<bool>() : def, vy = b.boolean_or(k, def);
    if (vx != vy) differ(k, vx ? "true" : "false", k, vy ? "true" : "false");
  }
}

// The folder's quantization settings (any family): config.json's quantization_config, else
// quantize_config.json's (AutoGPTQ before transformers' quantization_config: the same keys at
// its top level, quant_method absent meaning gptq). When both are there, config.json's is read
// and the two must agree on bits, group_size, sym and desc_act.
void read_quantization(const ConfigReader& c, const QuantizeFile& qf, BlockSpec& b) {
  if (qf.j) check_quantize_file(qf, c.family);
  if (const json* q = c.find({"quantization_config"})) {
    MOE_REQUIRE(q->is_object(), c.what, ": key 'quantization_config' must be an object, got ",
                q->dump());
    read_quant_settings(*q, c.what, "quantization_config.", c.family, b.quant);
    if (qf.j) check_files_agree(*q, c, qf);
  } else if (qf.j) {
    b.quant.from_quantize_file = true;
    b.quant.method = StoredQuant::Method::gptq;
    b.quant.method_name = "gptq";
    read_quant_settings(*qf.j, qf.what, "", c.family, b.quant);
  }
}

// clang-format off
const Family kFamilies[] = {
    {"mixtral",      "block_sparse_moe,mlp", "gate",       "w1,w3,w2",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major, "", "",
     configure_mixtral},
    {"qwen2_moe",    "mlp",              "gate",           "gate_proj,up_proj,down_proj",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major,
     "shared_expert", "shared_expert_gate", configure_qwen2_moe},
    {"qwen3_moe",    "mlp",              "gate",           "gate_proj,up_proj,down_proj",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major, "", "",
     configure_qwen3_moe},
    {"olmoe",        "mlp",              "gate",           "gate_proj,up_proj,down_proj",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major, "", "",
     configure_olmoe},
    {"deepseek_v2",  "mlp",              "gate",           "gate_proj,up_proj,down_proj",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major,
     "shared_experts", "", configure_deepseek_v2},
    {"deepseek_v3",  "mlp",              "gate",           "gate_proj,up_proj,down_proj",
     "experts.gate_up_proj,experts.down_proj", StackLayout::halves_out_major,
     "shared_experts", "", configure_deepseek_v3},
    {"gpt_oss",      "mlp",              "router",         "",
     "experts.gate_up_proj,experts.down_proj", StackLayout::interleaved_in_major, "", "",
     configure_gpt_oss},
    {"granitemoe",   "block_sparse_moe,mlp", "router.layer,router,gate", "",
     "input_linear.weight,output_linear.weight;experts.gate_up_proj,experts.down_proj",
     StackLayout::halves_out_major, "", "", configure_granitemoe},
};
// clang-format on

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = std::min(s.find(sep, start), s.size());
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

const Family& family_of(const ConfigReader& c) {
  const json* mt = c.find({"model_type"});
  MOE_REQUIRE(mt != nullptr, c.what, ": missing key 'model_type'");
  MOE_REQUIRE(mt->is_string(), c.what, ": key 'model_type' must be a string, got ", mt->dump());
  const std::string t = mt->get<std::string>();
  std::string known;
  for (const Family& f : kFamilies) {
    if (t == f.model_type) return f;
    known += (known.empty() ? "" : ", ") + std::string(f.model_type);
  }
  throw Error(cat(c.what, ": model_type '", t, "' is not a family libmoe loads (", known, ")"));
}

BlockSpec describe(const json& config, const std::string& what, const Family** fam,
                   const QuantizeFile& qf = {}) {
  ConfigReader c{config, what, ""};
  const Family& f = family_of(c);
  c.family = f.model_type;
  BlockSpec b;
  b.cfg.noise = Noise::none;
  b.cfg.aux_alpha = 0.0f;
  b.cfg.aux_loss_kind = AuxLossKind::none;
  b.cfg.capacity_factor.reset();
  b.cfg.precision = Precision::bf16;
  f.configure(c, b);
  read_quantization(c, qf, b);
  try {
    b.cfg.validate();
  } catch (const Error& e) {
    throw Error(cat(c.what, ": the ", f.model_type, " block is not a valid layer: ", e.what()));
  }
  if (fam) *fam = &f;
  return b;
}

BlockSpec describe(const PretrainedFolder& f, const Family** fam) {
  QuantizeFile qf;
  if (!f.quantize_config().is_null()) qf = {&f.quantize_config(), f.quantize_config_what()};
  return describe(f.config(), f.config_what(), fam, qf);
}

void check_layer(const BlockSpec& b, int64_t layer, const std::string& what,
                 const char* family) {
  MOE_REQUIRE(layer >= 0 && layer < b.n_layers, "layer: ", layer, " is out of range (", what,
              ": ", b.n_layers, " layers, 0..", b.n_layers - 1, ")");
  if (std::binary_search(b.moe_layers.begin(), b.moe_layers.end(), layer)) return;  // sorted
  // The nearest MoE layers below and above.
  int64_t below = -1, above = -1;
  for (int64_t l : b.moe_layers) {
    if (l < layer) below = l;
    if (l > layer && above < 0) above = l;
  }
  std::string nearest;
  if (below >= 0) nearest = cat(below);
  if (above >= 0) nearest += (nearest.empty() ? "" : " and ") + cat(above);
  throw Error(cat("layer: ", layer, " of this ", family, " model is a dense MLP, not an MoE block (",
                  b.dense_rule, "); the nearest MoE layers are ",
                  nearest.empty() ? std::string("none") : nearest));
}

// ---- resolving a block's tensors -------------------------------------------------------------

// One matrix or vector of the layer and where it comes from.
struct Job {
  std::string target;  // W_g, W1, W2, W3, Ws1, Ws2, Ws3, b_g, expert_bias, b1, b3, b2,
                       // w_shared_gate
  int64_t e = 0;       // expert (matrix targets)
  size_t weight = 0;   // index into Plan::weights
  int64_t we = 0;      // matrix of the stored stack
  MatrixMap map;       // matrix targets
};

struct Plan {
  BlockSpec spec;
  std::string base;     // "<prefix>layers.N.<block>."
  std::string layout;   // per-expert | stacked
  std::vector<StoredWeight> weights;
  std::vector<Job> jobs;  // grouped by weight, in weight order
};

// "<prefix>layers.<N>.<block>." for the first block name some tensor of the layer starts with.
std::string block_base(const PretrainedFolder& f, const Family& fam, int64_t layer) {
  const std::vector<std::string> blocks = split(fam.blocks, ',');
  const std::string mid = cat("layers.", layer, ".");
  for (const std::string& blk : blocks)
    for (const auto& [name, file] : f.tensor_files()) {
      const size_t at = name.find(mid + blk + ".");
      if (at == std::string::npos || (at > 0 && name[at - 1] != '.')) continue;
      return name.substr(0, at) + mid + blk + ".";
    }
  std::string tried;
  for (const std::string& blk : blocks) tried += (tried.empty() ? "" : ", ") + mid + blk + ".*";
  throw Error(cat("pretrained folder '", f.dir(), "': no tensor of layer ", layer, "'s MoE block (",
                  tried, ") in ", f.files().size() == 1 ? "its file" : "its files"));
}

Plan resolve(const PretrainedFolder& f, int64_t layer, const Family& fam, const BlockSpec& spec) {
  Plan p;
  p.spec = spec;
  const MoEConfig& m = spec.cfg;
  const int64_t E = m.n_experts, d = m.d_model, F = m.d_ff;
  p.base = block_base(f, fam, layer);
  const std::string& base = p.base;
  auto add_weight = [&](const std::string& name, const std::vector<int64_t>& shape) {
    p.weights.push_back(detail::open_weight(f, name, shape, spec.quant));
    return p.weights.size() - 1;
  };
  auto add_job = [&](const char* target, int64_t e, size_t w, int64_t we, MatrixMap map) {
    p.jobs.push_back({target, e, w, we, map});
  };
  auto out_major = [](int64_t In, int64_t Out, int64_t out_base = 0) {
    return MatrixMap{true, out_base, 1, 0, In, Out};
  };

  // Router.
  std::string router;
  for (const std::string& r : split(fam.routers, ','))
    if (router.empty() && (f.has(base + r + ".weight") || f.has(base + r + ".weight_blocks")))
      router = r;
  if (router.empty()) router = split(fam.routers, ',').front();  // the error names it
  add_job("W_g", 0, add_weight(base + router + ".weight", {E, d}), 0, out_major(d, E));
  if (spec.router_bias) add_job("b_g", 0, add_weight(base + router + ".bias", {E}), 0, {});
  if (spec.selection_bias)
    add_job("expert_bias", 0, add_weight(base + router + ".e_score_correction_bias", {E}), 0, {});

  // Routed experts: per-expert names when expert 0's gate is there, else a stacked pair.
  const std::vector<std::string> proj = split(fam.experts, ',');
  const auto has_any = [&](const std::string& n) {
    const bool linear = n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0;
    return f.has(n) || f.has(n + "_blocks") ||
           (linear && f.has(n.substr(0, n.size() - 7) + ".qweight"));  // GPTQ / AWQ
  };
  if (proj.size() == 3 && has_any(base + "experts.0." + proj[0] + ".weight")) {
    p.layout = "per-expert";
    for (int64_t e = 0; e < E; ++e) {
      const std::string pre = cat(base, "experts.", e, ".");
      add_job("W1", e, add_weight(pre + proj[0] + ".weight", {F, d}), 0, out_major(d, F));
      add_job("W3", e, add_weight(pre + proj[1] + ".weight", {F, d}), 0, out_major(d, F));
      add_job("W2", e, add_weight(pre + proj[2] + ".weight", {d, F}), 0, out_major(F, d));
    }
  } else {
    p.layout = "stacked";
    const std::vector<std::string> stacks = split(fam.stacks, ';');
    std::vector<std::string> pair;
    for (const std::string& s : stacks) {
      std::vector<std::string> two = split(s, ',');
      if (pair.empty() && has_any(base + two[0])) pair = two;
    }
    if (pair.empty()) {
      std::string tried = proj.size() == 3 ? cat("'", base, "experts.0.", proj[0], ".weight'") : "";
      for (const std::string& s : stacks)
        tried += (tried.empty() ? "'" : ", '") + base + split(s, ',')[0] + "'";
      throw Error(cat("pretrained folder '", f.dir(), "': the experts of layer ", layer,
                      " are missing (looked for ", tried, ")"));
    }
    const std::string gu = base + pair[0], dn = base + pair[1];
    // MXFP4 stacks are stored (E, out, in) whatever the layout of the plain ones.
    const bool in_major = fam.layout == StackLayout::interleaved_in_major;
    const bool gu_in = in_major && !f.has(gu + "_blocks") && f.has(gu);
    const bool dn_in = in_major && !f.has(dn + "_blocks") && f.has(dn);
    const size_t wgu = add_weight(gu, gu_in ? std::vector<int64_t>{E, d, 2 * F}
                                            : std::vector<int64_t>{E, 2 * F, d});
    const size_t wdn = add_weight(dn, dn_in ? std::vector<int64_t>{E, F, d}
                                            : std::vector<int64_t>{E, d, F});
    for (int64_t e = 0; e < E; ++e) {
      if (in_major) {  // gate even, up odd
        add_job("W1", e, wgu, e, MatrixMap{!gu_in, 0, 2, 0, d, F});
        add_job("W3", e, wgu, e, MatrixMap{!gu_in, 1, 2, 0, d, F});
      } else {
        add_job("W1", e, wgu, e, out_major(d, F));
        add_job("W3", e, wgu, e, out_major(d, F, F));
      }
    }
    for (int64_t e = 0; e < E; ++e)
      add_job("W2", e, wdn, e, dn_in ? MatrixMap{false, 0, 1, 0, F, d} : out_major(F, d));
    if (spec.expert_biases) {
      add_job("b13", 0, add_weight(gu + "_bias", {E, 2 * F}), 0, {});
      add_job("b2", 0, add_weight(dn + "_bias", {E, d}), 0, {});
    }
  }

  // The shared expert: one MLP of width shared_d_ff.
  if (m.n_shared_experts > 0) {
    MOE_ASSERT(m.n_shared_experts == 1);
    const int64_t Fs = m.shared_hidden();
    const std::string pre = base + fam.shared + ".";
    add_job("Ws1", 0, add_weight(pre + "gate_proj.weight", {Fs, d}), 0, out_major(d, Fs));
    add_job("Ws3", 0, add_weight(pre + "up_proj.weight", {Fs, d}), 0, out_major(d, Fs));
    add_job("Ws2", 0, add_weight(pre + "down_proj.weight", {d, Fs}), 0, out_major(Fs, d));
    if (m.shared_gate)
      add_job("w_shared_gate", 0, add_weight(base + fam.shared_gate + ".weight", {1, d}), 0, {});
  }
  // Jobs of one stored weight together, so that its pages can be handed back after them.
  std::stable_sort(p.jobs.begin(), p.jobs.end(),
                   [](const Job& a, const Job& b) { return a.weight < b.weight; });
  return p;
}

bool is_matrix_target(const std::string& t) {
  return t == "W1" || t == "W2" || t == "W3" || t == "Ws1" || t == "Ws2" || t == "Ws3";
}

// A plain BF16 tensor going into a bf16 layer: no decoding needed (its bytes are read into an
// aligned buffer, wherever they sit in the file).
bool bf16_direct(const StoredWeight& w, Precision precision) {
  return precision == Precision::bf16 && w.format == StoredWeight::Format::plain &&
         w.dtype == "BF16";
}

// Runs the plan's jobs into the layer: the expert matrices first, in parallel over the stored
// matrices they read (decoded ones through each thread's scratch, bf16 ones read by one
// thread and packed by the others), then the router, biases and gates, serially.
void execute(MoELayer& L, const Plan& p) {
  const MoEConfig& m = p.spec.cfg;
  const int64_t E = m.n_experts, d = m.d_model, F = m.d_ff;
  const bool masters = L.holds_masters();
  const Precision precision = L.config().precision;
  int64_t most = 0;  // the scratch: one expert matrix, when the layer holds no masters
  std::map<std::string, float*> master;  // resolved here: param() marks copies stale
  for (const Job& j : p.jobs) {
    if (!is_matrix_target(j.target)) continue;
    if (masters && !master.count(j.target)) master[j.target] = L.param(j.target).ptr();
    if (!masters) most = std::max(most, j.map.In * j.map.Out);
  }
  // Groups of matrix jobs that read one stored matrix (gpt_oss's gate_up gives two).
  std::vector<size_t> group;  // first job of each group; jobs of a group are adjacent
  for (size_t i = 0; i < p.jobs.size(); ++i)
    if (is_matrix_target(p.jobs[i].target) &&
        (i == 0 || p.jobs[i - 1].weight != p.jobs[i].weight || p.jobs[i - 1].we != p.jobs[i].we))
      group.push_back(i);
  const auto group_end = [&](size_t i) {
    size_t n = i + 1;
    while (n < p.jobs.size() && p.jobs[n].weight == p.jobs[i].weight &&
           p.jobs[n].we == p.jobs[i].we)
      ++n;
    return n;
  };
  // The matrices of one group, from `scratch` (decoded to fp32) or from `bytes` (the stored
  // bf16 values of a bf16_direct group, packed as they are).
  const auto convert_group = [&](size_t first, const uint16_t* bytes,
                                 std::unique_ptr<float[]>& scratch) {
    for (size_t i = first, end = group_end(first); i < end; ++i) {
      const Job& j = p.jobs[i];
      const StoredWeight& w = p.weights[j.weight];
      if (masters) {  // straight into the master
        detail::read_matrix(master.at(j.target) + j.e * j.map.In * j.map.Out, w, j.we, j.map);
      } else if (bytes) {
        const MatrixMap& mm = j.map;
        const int64_t C = w.cols;
        if (mm.out_major)
          L.set_expert_matrix_bf16(j.target, j.e, bytes + mm.out_base * C + mm.in_base, 1,
                                   mm.out_step * C);
        else
          L.set_expert_matrix_bf16(j.target, j.e, bytes + mm.in_base * C + mm.out_base, C,
                                   mm.out_step);
      } else if (detail::keeps_stored(w, j.map, precision)) {
        // fp8 / mxfp4 / GPTQ / AWQ into a layer of that precision: the stored bytes (GPTQ
        // and AWQ repacked), never a wider copy of the matrix.
        detail::StoredView sv;
        detail::stored_view(w, j.we, j.map, sv);
        detail::LayerAccess::set_expert_matrix_stored(L, j.target, j.e, sv.view);
      } else {
        if (!scratch) scratch.reset(new float[static_cast<size_t>(most)]);
        detail::read_matrix(scratch.get(), w, j.we, j.map);
        L.set_expert_matrix(j.target, j.e, scratch.get());
      }
    }
  };
  std::vector<size_t> decoded, direct;  // groups by how they are converted
  uint64_t direct_most = 0, direct_all = 0;
  for (size_t first : group) {
    const StoredWeight& w = p.weights[p.jobs[first].weight];
    if (masters || !bf16_direct(w, precision)) {
      decoded.push_back(first);
      continue;
    }
    direct.push_back(first);
    const uint64_t n = static_cast<uint64_t>(w.rows * w.cols) * sizeof(uint16_t);
    direct_most = std::max(direct_most, n);
    direct_all += n;
  }
  // Read in file order: the disk streams, and the kernel's readahead runs ahead of the reader
  // (the plan's order is by expert, a file's is by name: experts.10 before experts.2).
  std::sort(direct.begin(), direct.end(), [&](size_t a, size_t b) {
    const StoredWeight &wa = p.weights[p.jobs[a].weight], &wb = p.weights[p.jobs[b].weight];
    if (wa.w.view != wb.w.view) return wa.w.view->path() < wb.w.view->path();
    return wa.file_offset(p.jobs[a].we) < wb.file_offset(p.jobs[b].we);
  });
  std::exception_ptr failed;
  const auto fail = [&failed] {
#pragma omp critical(moe_pretrained_failed)
    if (!failed) failed = std::current_exception();
  };

  // Decoded groups: each thread reads (through the mapping) and converts whole matrices.
  const int64_t G = static_cast<int64_t>(decoded.size());
  const auto prefetch = [&](int64_t g) {
    p.weights[p.jobs[decoded[g]].weight].prefetch(p.jobs[decoded[g]].we);
  };
  if (G > 0) prefetch(0);
  // A low-bit block's load holds, per thread, one stored matrix's mapped pages and (GPTQ /
  // AWQ) its repacked copy, or (a converted matrix) an fp32 scratch: as many threads as keep
  // that within an eighth of the block's stored bytes (peak memory, SPEC §7), at least one.
  int low_threads = omp_get_max_threads();
  if (!masters && low_bit(precision) && G > 1) {
    uint64_t all = 0, most_one = 0;
    for (size_t first : decoded) {
      const Job& j = p.jobs[first];
      const StoredWeight& w = p.weights[j.weight];
      const uint64_t per = static_cast<uint64_t>(w.file_bytes() / std::max<int64_t>(w.stack, 1));
      const bool int4 = w.format == StoredWeight::Format::gptq ||
                        w.format == StoredWeight::Format::awq;
      all += per;
      const uint64_t held = detail::keeps_stored(w, j.map, precision)
                                ? (int4 ? 2 * per : per)
                                : per + 4 * static_cast<uint64_t>(j.map.In * j.map.Out);
      most_one = std::max(most_one, held);
    }
    low_threads = static_cast<int>(std::clamp<uint64_t>(
        all / 8 / std::max<uint64_t>(most_one, 1), 1, static_cast<uint64_t>(low_threads)));
  }
#pragma omp parallel if (G > 1) num_threads(low_threads)
  {
    std::unique_ptr<float[]> scratch;  // made on first use (fp8 and mxfp4 never need it whole)
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < G; ++g) {
      try {
        // The disk reads the matrix after next while this one is converted (a cold load is
        // otherwise read, convert, read, ...).
        if (g + 2 < G) prefetch(g + 2);
        else if (g + 1 < G && g == 0) prefetch(1);
        convert_group(decoded[g], nullptr, scratch);
        p.weights[p.jobs[decoded[g]].weight].release(p.jobs[decoded[g]].we);
      } catch (...) {
        fail();
      }
    }
  }
  if (failed) std::rethrow_exception(failed);

  // bf16_direct groups: one thread reads the stored matrices in order with pread (large
  // sequential reads keep the disk busy; faulting the mapping in, or every thread reading and
  // then packing in turn, left it idle half the time: docs/design.md, "Loading a block"),
  // the others pack each as soon as it is read. The buffers hold one stored matrix each and
  // are bounded to an eighth of the block's bytes (peak memory, SPEC §7), at least two.
  const int64_t D = static_cast<int64_t>(direct.size());
  const int threads = D > 1 ? omp_get_max_threads() : 1;
  if (threads == 1) {
    std::unique_ptr<float[]> unused;  // convert_group's scratch, never made for these groups
    std::unique_ptr<uint16_t[]> bytes(D > 0 ? new uint16_t[direct_most / 2] : nullptr);
    for (int64_t g = 0; g < D; ++g) {
      p.weights[p.jobs[direct[g]].weight].read_bytes(p.jobs[direct[g]].we, bytes.get());
      convert_group(direct[g], bytes.get(), unused);
    }
  } else {
    const size_t nbuf = static_cast<size_t>(std::clamp<uint64_t>(
        direct_all / 8 / direct_most, 2, static_cast<uint64_t>(threads) + 1));
    std::vector<std::unique_ptr<uint16_t[]>> bufs(nbuf);
    std::vector<size_t> free_bufs(nbuf);
    for (size_t b = 0; b < nbuf; ++b) free_bufs[b] = b;
    std::deque<std::pair<int64_t, size_t>> ready;  // (group, buffer) read, not yet packed
    bool read_all = false;
    std::mutex mu;
    std::condition_variable cv;
    // Packs a read matrix and hands its buffer back.
    const auto pack = [&](const std::pair<int64_t, size_t>& job) {
      std::unique_ptr<float[]> none;  // convert_group's scratch, never made for these groups
      try {
        convert_group(direct[job.first], bufs[job.second].get(), none);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        fail();
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        free_bufs.push_back(job.second);
      }
      cv.notify_all();
    };
#pragma omp parallel num_threads(threads)
    {
      // The reader; when every buffer waits to be packed, it packs one itself (packing, with
      // the first touch of the packed stacks, can be the slower side), and once everything
      // is read it packs like the others.
      if (omp_get_thread_num() == 0) {
        for (int64_t g = 0; g < D; ++g) {
          size_t b = 0;
          bool stop = false;
          for (;;) {
            std::pair<int64_t, size_t> job;
            {
              std::unique_lock<std::mutex> lock(mu);
              cv.wait(lock, [&] { return !free_bufs.empty() || !ready.empty() || failed; });
              if (failed) {
                stop = true;
                break;
              }
              if (!free_bufs.empty()) {
                b = free_bufs.back();
                free_bufs.pop_back();
                break;
              }
              job = ready.front();
              ready.pop_front();
            }
            pack(job);
          }
          if (stop) break;
          try {
            if (!bufs[b]) bufs[b].reset(new uint16_t[direct_most / 2]);
            p.weights[p.jobs[direct[g]].weight].read_bytes(p.jobs[direct[g]].we, bufs[b].get());
          } catch (...) {
            std::lock_guard<std::mutex> lock(mu);
            fail();
            break;
          }
          {
            std::lock_guard<std::mutex> lock(mu);
            ready.emplace_back(g, b);
          }
          cv.notify_all();
        }
        {
          std::lock_guard<std::mutex> lock(mu);
          read_all = true;
        }
        cv.notify_all();
      }
      for (;;) {
        std::pair<int64_t, size_t> job;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return !ready.empty() || read_all || failed; });
          if (ready.empty() || failed) break;
          job = ready.front();
          ready.pop_front();
        }
        pack(job);
      }
    }
  }
  if (failed) std::rethrow_exception(failed);
  if (masters) L.weights_changed();
  std::vector<float> row;
  for (size_t i = 0; i < p.jobs.size(); ++i) {
    const Job& j = p.jobs[i];
    const StoredWeight& w = p.weights[j.weight];
    if (is_matrix_target(j.target)) {
      continue;  // done above
    } else if (j.target == "W_g") {
      detail::read_matrix(L.param("W_g").ptr(), w, 0, j.map);
    } else if (j.target == "b_g" || j.target == "expert_bias") {
      Tensor& t = j.target == "b_g" ? L.param("b_g") : L.expert_bias();
      w.row(t.ptr(), 0, 0);
    } else if (j.target == "w_shared_gate") {
      w.row(L.param("w_shared_gate").ptr(), 0, 0);
    } else if (j.target == "b13") {  // (E, 2F): gate even, up odd
      row.resize(static_cast<size_t>(2 * F));
      float* b1 = L.param("b1").ptr();
      float* b3 = L.param("b3").ptr();
      for (int64_t e = 0; e < E; ++e) {
        w.row(row.data(), 0, e);
        for (int64_t c = 0; c < F; ++c) {
          b1[e * F + c] = row[2 * c];
          b3[e * F + c] = row[2 * c + 1];
        }
      }
    } else {
      MOE_ASSERT(j.target == "b2");
      float* b2 = L.param("b2").ptr();
      for (int64_t e = 0; e < E; ++e) w.row(b2 + e * d, 0, e);
    }
    // The last job of this weight's matrix: its pages go back.
    const bool last = i + 1 == p.jobs.size() || p.jobs[i + 1].weight != j.weight ||
                      p.jobs[i + 1].we != j.we;
    if (last) w.release(j.we);
  }
  // A non-finite weight would only show up as non-finite outputs much later.
  for (const char* name : {"W_g", "b_g"}) {
    const auto names = L.parameter_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) continue;
    for (float v : L.param(name).data)
      MOE_REQUIRE(std::isfinite(v), "pretrained folder: router tensor '", p.base,
                  "...' has a non-finite value (", name, ")");
  }
}

}  // namespace

namespace detail {

MoEConfig pretrained_config_from_json(const std::string& text, const std::string& what) {
  const json j = parse_json_checked(text, what, "the file");
  MOE_REQUIRE(j.is_object(), what, ": expected a JSON object, got ", j.type_name());
  return describe(j, what, nullptr).cfg;
}

MoEConfig pretrained_config_from_json(const std::string& text, const std::string& what,
                                      const std::string& quantize_text,
                                      const std::string& quantize_what) {
  const json j = parse_json_checked(text, what, "the file");
  MOE_REQUIRE(j.is_object(), what, ": expected a JSON object, got ", j.type_name());
  const json q = parse_json_checked(quantize_text, quantize_what, "the file");
  MOE_REQUIRE(q.is_object(), quantize_what, ": expected a JSON object, got ", q.type_name());
  return describe(j, what, nullptr, {&q, quantize_what}).cfg;
}

}  // namespace detail

MoEConfig pretrained_config(const std::string& dir, int64_t layer) {
  PretrainedFolder f(dir);
  const Family* fam = nullptr;
  BlockSpec b = describe(f, &fam);
  check_layer(b, layer, f.config_what(), fam->model_type);
  return b.cfg;
}

MoELayer load_pretrained(const std::string& dir, int64_t layer, Precision precision) {
  LayerOptions opt;
  opt.masters = false;
  return load_pretrained(dir, layer, precision, opt);
}

namespace {

// A stored expert matrix's format in words, for `moe inspect`.
std::string stored_format_words(const StoredWeight& w, const StoredQuant& q) {
  switch (w.format) {
    case StoredWeight::Format::fp8_block:
      return cat("fp8 e4m3 (block ", w.block_rows, "x", w.block_cols, ")");
    case StoredWeight::Format::mxfp4:
      return "mxfp4 (e2m1, e8m0 scale per 32)";
    case StoredWeight::Format::gptq:
    case StoredWeight::Format::awq: {
      const bool gptq = w.format == StoredWeight::Format::gptq;
      std::string s = cat(gptq ? "gptq" : "awq", " int4 ",
                          w.group == -1 ? std::string("g-1 (one group)") : cat("g", w.group));
      if (gptq) {
        s += q.sym ? " sym" : " asym";
        if (q.desc_act) s += " act-order";
        s += w.zeros_minus_one ? " (v1 zeros)" : " (v2 zeros)";
      } else {
        s += " (gemm)";
      }
      return s;
    }
    default: {
      std::string s = w.dtype;
      std::transform(s.begin(), s.end(), s.begin(),
                     [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      return s;
    }
  }
}

// Each format of the block's expert matrices in words, the routed experts' first.
std::string expert_format_words(const Plan& p, const StoredQuant& q) {
  std::vector<std::string> formats;
  for (const Job& j : p.jobs) {
    if (!is_matrix_target(j.target)) continue;
    const std::string s = stored_format_words(p.weights[j.weight], q);
    if (std::find(formats.begin(), formats.end(), s) == formats.end()) formats.push_back(s);
  }
  std::string out;
  for (size_t i = 0; i < formats.size(); ++i)
    out += (i == 0 ? "" : i == 1 ? "; also " : ", ") + formats[i];
  return out;
}

// The precision of the block's routed experts as stored ("auto"): fp8, mxfp4, int4 (GPTQ /
// AWQ), else bf16.
Precision plan_stored_precision(const Plan& p) {
  for (const Job& j : p.jobs)
    if (j.target == "W1") return detail::stored_precision(p.weights[j.weight].format);
  return Precision::bf16;
}

// int4 layers: libmoe's own quantizer (for any matrix not stored as int4) takes the
// checkpoint's group and symmetry where it can hold them.
void int4_like_stored(MoEConfig& cfg, const StoredQuant& q) {
  if (!q.int4()) return;
  if (q.group == 32 || q.group == 64 || q.group == 128) cfg.int4_group = q.group;
  cfg.int4_zero_points = q.method == StoredQuant::Method::awq || !q.sym;
}

MoELayer load_plan(PretrainedFolder& f, int64_t layer, const Family& fam, BlockSpec& b,
                   const Precision* precision, const LayerOptions& options) {
  Plan plan = resolve(f, layer, fam, b);  // every name and shape checked first
  b.cfg.precision = precision ? *precision : plan_stored_precision(plan);
  if (b.cfg.precision == Precision::int4) int4_like_stored(b.cfg, b.quant);
  plan.spec.cfg = b.cfg;
  LayerOptions opt = options;
  opt.initialise = false;  // every parameter is read from the folder
  MoELayer L(b.cfg, opt);
  execute(L, plan);
  return L;
}

}  // namespace

MoELayer load_pretrained(const std::string& dir, int64_t layer, AutoPrecision) {
  LayerOptions opt;
  opt.masters = false;
  return load_pretrained(dir, layer, precision_auto, opt);
}

MoELayer load_pretrained(const std::string& dir, int64_t layer, AutoPrecision,
                         const LayerOptions& options) {
  PretrainedFolder f(dir);
  const Family* fam = nullptr;
  BlockSpec b = describe(f, &fam);
  check_layer(b, layer, f.config_what(), fam->model_type);
  return load_plan(f, layer, *fam, b, nullptr, options);
}

MoELayer load_pretrained(const std::string& dir, int64_t layer, Precision precision,
                         const LayerOptions& options) {
  PretrainedFolder f(dir);
  const Family* fam = nullptr;
  BlockSpec b = describe(f, &fam);
  check_layer(b, layer, f.config_what(), fam->model_type);
  return load_plan(f, layer, *fam, b, &precision, options);
}

PretrainedInfo inspect_pretrained(const std::string& dir) {
  PretrainedFolder f(dir);
  const Family* fam = nullptr;
  const BlockSpec b = describe(f, &fam);
  PretrainedInfo info;
  const MoEConfig& m = b.cfg;
  info.family = fam->model_type;
  info.n_layers = b.n_layers;
  info.moe_layers = b.moe_layers;
  for (int64_t l = 0; l < b.n_layers; ++l)
    if (!std::binary_search(b.moe_layers.begin(), b.moe_layers.end(), l))
      info.dense_layers.push_back(l);
  info.n_experts = m.n_experts;
  info.k = m.k;
  info.d_model = m.d_model;
  info.d_ff = m.d_ff;
  info.expert = to_string(m.expert);
  info.router = b.router;
  info.n_shared_experts = m.n_shared_experts;
  info.shared_d_ff = m.n_shared_experts > 0 ? m.shared_hidden() : 0;
  info.shared_gate = m.shared_gate;
  info.files = f.files();
  info.config = m;
  if (b.moe_layers.empty()) return info;
  const Plan p = resolve(f, b.moe_layers.front(), *fam, b);
  info.layout = p.layout;
  int64_t values_experts = 0, values_rest = 0;
  info.auto_precision = to_string(plan_stored_precision(p));
  info.expert_format = expert_format_words(p, b.quant);
  for (const StoredWeight& w : p.weights) {
    info.dtypes[w.dtype] += 1;
    info.file_bytes_per_block += w.file_bytes();
  }
  for (const Job& j : p.jobs) {
    if (is_matrix_target(j.target))
      values_experts += j.map.In * j.map.Out;
    else if (j.target == "W_g")
      values_rest += j.map.In * j.map.Out;
  }
  // Vectors: router bias, selection bias, expert biases, shared gate.
  values_rest += (b.router_bias ? m.n_experts : 0) + (b.selection_bias ? m.n_experts : 0) +
                 (b.expert_biases ? m.n_experts * (2 * m.d_ff + m.d_model) : 0) +
                 (m.shared_gate ? m.d_model : 0);
  info.bf16_bytes_per_block = 2 * values_experts + 4 * values_rest;
  info.fp32_bytes_per_block = 4 * (values_experts + values_rest);
  return info;
}

}  // namespace moe

namespace moe::detail {

StoredBlockFormat stored_block_format(const std::string& dir, int64_t layer) {
  PretrainedFolder f(dir);
  const Family* fam = nullptr;
  BlockSpec b = describe(f, &fam);
  check_layer(b, layer, f.config_what(), fam->model_type);
  const Plan p = resolve(f, layer, *fam, b);
  b.cfg.precision = plan_stored_precision(p);
  if (b.cfg.precision == Precision::int4) int4_like_stored(b.cfg, b.quant);
  return {b.cfg.precision, expert_format_words(p, b.quant), b.cfg};
}

}  // namespace moe::detail
