// `moe gate --input F`: noisy top-k gating of given logits (SPEC §5).
//   in:  {"logits": [..] or [[..]], "k": 2, "noise_stddev": 1.0, "training": true,
//         "seed": 0, "round": 3?}
//   out: {"gates": …} with the logits' shape.
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "commands.hpp"
#include "json_input.hpp"
#include "moe/router.hpp"

namespace moe::cli {

namespace {

struct GateOptions {
  std::string input;
};

json gate_json(const json& in) {
  check_known_fields(in, {"logits", "k", "noise_stddev", "training", "seed", "round"});
  const Matrix logits = get_matrix(in, "logits", /*allow_flat=*/true);
  const int64_t k = get_int(in, "k");
  if (k < 1 || k > logits.cols)
    throw InputError("k: must be in 1.." + std::to_string(logits.cols) +
                     " (the number of experts, logits' last dimension), got " +
                     std::to_string(k));
  const double sigma = get_number(in, "noise_stddev", 1.0);
  if (sigma < 0.0) {  // the library's message (docs/errors.md R4), the value as JSON had it
    std::ostringstream os;
    os << "noise_stddev: must be finite and >= 0, got " << sigma;
    throw InputError(os.str());
  }
  const bool training = get_bool(in, "training", true);
  const uint64_t seed = get_seed(in, "seed", 0);
  const auto round = get_int_opt(in, "round");
  if (round && (*round < 0 || *round > 15))
    throw InputError("round: must be in 0..15, got " + std::to_string(*round));

  const auto gates = noisy_top_k_gating(logits.data.data(), logits.rows, logits.cols, k,
                                        static_cast<float>(sigma), training, seed);
  json out;
  out["gates"] = matrix_json(gates.data(), logits.rows, logits.cols, logits.flat, round);
  return out;
}

int run_gate(const GateOptions& o) {
  const json out = gate_json(read_json_input(o.input));
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

std::string run_gate_json(const std::string& text) {
  return gate_json(parse_json_input(text)).dump();
}

void add_gate_command(CLI::App& app, int& status) {
  auto o = std::make_shared<GateOptions>();
  CLI::App* sub = app.add_subcommand(
      "gate", "Noisy top-k gating of given logits: softmax over the k largest of "
              "logits + noise_stddev·N(0,1) (no noise when training is false). JSON in, JSON out.");
  sub->add_option("-i,--input", o->input,
                  "JSON file, or - for standard input: {\"logits\": [..] or [[..]], \"k\": 2, "
                  "\"noise_stddev\": 1.0, \"training\": true, \"seed\": 0, \"round\": 3?}")
      ->required();
  sub->footer("Output: {\"gates\": ...} with the shape of logits. Exit status 2 on bad input.");
  sub->callback([o, &status] { status = run_gate(*o); });
}

}  // namespace moe::cli
