// `moe inspect PATH [--json]`: a Hugging Face model folder's MoE blocks (SPEC §7): family,
// MoE and dense layers, E, k, d, d_ff, router, shared experts, dtypes, the experts' stored
// format (what precision "auto" keeps) and bytes per block.
// Reads config.json and the safetensors headers only.
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "commands.hpp"
#include "moe/pretrained.hpp"

namespace moe::cli {

namespace {

struct InspectOptions {
  std::string path;
  bool json = false;
};

// "0-3, 5, 7-9": runs of consecutive layers.
std::string ranges(const std::vector<int64_t>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    os << (i ? ", " : "") << v[i];
    if (j > i) os << "-" << v[j];
    i = j + 1;
  }
  return v.empty() ? "none" : os.str();
}

// "2688.1 MiB", "12.5 KiB": MiB from 1 MiB up.
std::string mib(int64_t bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(1);
  if (bytes >= (int64_t{1} << 20))
    os << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  else
    os << static_cast<double>(bytes) / 1024.0 << " KiB";
  return os.str();
}

nlohmann::ordered_json info_json(const PretrainedInfo& i) {
  nlohmann::ordered_json j;
  j["family"] = i.family;
  j["layers"] = i.n_layers;
  j["moe_layers"] = i.moe_layers;
  j["dense_layers"] = i.dense_layers;
  j["n_experts"] = i.n_experts;
  j["k"] = i.k;
  j["d_model"] = i.d_model;
  j["d_ff"] = i.d_ff;
  j["expert"] = i.expert;
  j["router"] = i.router;
  j["n_shared_experts"] = i.n_shared_experts;
  j["shared_d_ff"] = i.shared_d_ff;
  j["shared_gate"] = i.shared_gate;
  j["layout"] = i.layout;
  j["dtypes"] = i.dtypes;
  j["expert_format"] = i.expert_format;
  j["auto_precision"] = i.auto_precision;
  j["file_bytes_per_block"] = i.file_bytes_per_block;
  j["bf16_bytes_per_block"] = i.bf16_bytes_per_block;
  j["fp32_bytes_per_block"] = i.fp32_bytes_per_block;
  j["files"] = i.files;
  return j;
}

int run_inspect(const InspectOptions& o) {
  const PretrainedInfo i = inspect_pretrained(o.path);
  if (o.json) {
    std::cout << info_json(i).dump(2) << std::endl;
    return 0;
  }
  std::ostringstream os;
  os << "family        " << i.family << "\n"
     << "layers        " << i.n_layers << " (MoE: " << ranges(i.moe_layers)
     << "; dense: " << ranges(i.dense_layers) << ")\n"
     << "experts       E = " << i.n_experts << ", k = " << i.k << ", d = " << i.d_model
     << ", d_ff = " << i.d_ff << " (" << i.expert << ")\n"
     << "router        " << i.router << "\n"
     << "shared        ";
  if (i.n_shared_experts == 0)
    os << "none\n";
  else
    os << i.n_shared_experts << " of d_ff " << i.shared_d_ff
       << (i.shared_gate ? ", gated by sigmoid(x . shared_expert_gate)" : ", ungated") << "\n";
  os << "tensor names  " << (i.layout.empty() ? "-" : i.layout) << "\n"
     << "dtypes        ";
  bool first = true;
  for (const auto& [dt, n] : i.dtypes) {
    os << (first ? "" : ", ") << dt << " x" << n;
    first = false;
  }
  os << "\n"
     << "experts as    " << (i.expert_format.empty() ? "-" : i.expert_format)
     << (i.auto_precision.empty() ? "" : " (precision auto: " + i.auto_precision + ")") << "\n"
     << "per block     " << mib(i.file_bytes_per_block) << " in the files, "
     << mib(i.bf16_bytes_per_block) << " loaded in bf16, " << mib(i.fp32_bytes_per_block)
     << " in fp32\n"
     << "files         " << i.files.size() << "\n";
  std::cout << os.str();
  return 0;
}

}  // namespace

void add_inspect_command(CLI::App& app, int& status) {
  auto o = std::make_shared<InspectOptions>();
  CLI::App* sub = app.add_subcommand(
      "inspect", "List the MoE blocks of a Hugging Face model folder (config.json and "
                 "*.safetensors): family, MoE layers, E, k, d, d_ff, router, shared experts, "
                 "dtypes, the experts' stored format (bf16, fp8, mxfp4, gptq/awq int4: what precision "
                 "auto keeps) and bytes per block. Reads headers only.");
  sub->add_option("path", o->path, "the model folder")->required();
  sub->add_flag("--json", o->json, "one JSON object instead of the table");
  sub->footer("Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, "
              "gpt_oss, granitemoe (docs/models.md). Exit status 2 on a bad folder.");
  sub->callback([o, &status] { status = run_inspect(*o); });
}

}  // namespace moe::cli
