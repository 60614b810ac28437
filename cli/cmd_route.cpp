// `moe route --input F`: the router of SPEC §1 on given weights (SPEC §5).
//   in:  {"X": [[..]], "W_g": [[..]], "k": 2, "b_g": [..]?, "W_noise": [[..]]?, "N": [[..]]?,
//         "noise_scale": "softplus"|"linear"?, "tie_break": "high"|"low"|"torch"?,
//         "training": true?, "seed": 0?, "round": 3?}
//   out: {"gates": [[..]], "indices": [[..]], "weights": [[..]]}
// Without W_noise there is no noise; W_noise without N draws ε from the seed.
#include <iostream>
#include <memory>
#include <string>

#include "commands.hpp"
#include "json_input.hpp"
#include "moe/router.hpp"

namespace moe::cli {

namespace {

struct RouteOptions {
  std::string input;
};

std::string shape(const Matrix& m) {
  return "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]";
}

template <typename Parse>
auto parse_enum(const json& in, const char* field, const char* def, Parse parse) {
  const std::string s = get_string(in, field, def);
  return parse(s);  // throws moe::Error naming the field
}

json route_json(const json& in) {
  check_known_fields(in, {"X", "W_g", "k", "b_g", "W_noise", "N", "noise_scale", "tie_break",
                          "training", "seed", "round"});
  const Matrix X = get_matrix(in, "X");
  const Matrix W_g = get_matrix(in, "W_g");
  const int64_t T = X.rows, d = X.cols, E = W_g.cols;
  if (W_g.rows != d)
    throw InputError("W_g: expected " + std::to_string(d) + " rows (X has " + std::to_string(d) +
                     " columns), got shape " + shape(W_g));
  const int64_t k = get_int(in, "k");
  if (k < 1 || k > E)
    throw InputError("k: must be in 1.." + std::to_string(E) +
                     " (the number of experts, W_g's columns), got " + std::to_string(k));

  std::optional<Matrix> b_g;
  if (in.contains("b_g") && !in["b_g"].is_null()) {
    b_g = get_matrix(in, "b_g", /*allow_flat=*/true);
    if (!b_g->flat || b_g->cols != E)
      throw InputError("b_g: expected a flat array of " + std::to_string(E) + " numbers");
  }
  const auto W_noise = get_matrix_opt(in, "W_noise");
  if (W_noise && (W_noise->rows != d || W_noise->cols != E))
    throw InputError("W_noise: expected shape [" + std::to_string(d) + ", " + std::to_string(E) +
                     "] (like W_g), got " + shape(*W_noise));
  const auto N = get_matrix_opt(in, "N");
  if (N && !W_noise) throw InputError("N: given without W_noise (no noise is applied without it)");
  if (N && (N->rows != T || N->cols != E))
    throw InputError("N: expected shape [" + std::to_string(T) + ", " + std::to_string(E) +
                     "] (tokens × experts), got " + shape(*N));

  RouterConfig cfg;
  cfg.d_model = d;
  cfg.n_experts = E;
  cfg.k = k;
  cfg.noise = W_noise ? Noise::learned : Noise::none;
  cfg.noise_scale = parse_enum(in, "noise_scale", "softplus", parse_noise_scale);
  cfg.tie_break = parse_enum(in, "tie_break", "high", parse_tie_break);
  cfg.use_bias = b_g.has_value();
  const bool training = get_bool(in, "training", true);
  NoiseSource ns;
  ns.seed = get_seed(in, "seed", 0);
  ns.eps = N ? N->data.data() : nullptr;
  const auto round = get_int_opt(in, "round");
  if (round && (*round < 0 || *round > 15))
    throw InputError("round: must be in 0..15, got " + std::to_string(*round));

  RouterParams p;
  p.W_g = W_g.data.data();
  p.b_g = b_g ? b_g->data.data() : nullptr;
  p.W_noise = W_noise ? W_noise->data.data() : nullptr;
  RouterState s;
  router_forward(s, X.data.data(), p, cfg, T, training, ns);

  const auto gates = s.dense_gates();
  json out;
  out["gates"] = matrix_json(gates.data(), T, E, false, round);
  json idx = json::array();
  for (int64_t t = 0; t < T; ++t) {
    json row = json::array();
    for (int64_t j = 0; j < k; ++j) row.push_back(s.indices[t * k + j]);
    idx.push_back(std::move(row));
  }
  out["indices"] = std::move(idx);
  out["weights"] = matrix_json(s.weights.data(), T, k, false, round);
  return out;
}

int run_route(const RouteOptions& o) {
  const json out = route_json(read_json_input(o.input));
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

std::string run_route_json(const std::string& text) {
  return route_json(parse_json_input(text)).dump();
}

void add_route_command(CLI::App& app, int& status) {
  auto o = std::make_shared<RouteOptions>();
  CLI::App* sub = app.add_subcommand(
      "route", "Route tokens X with router weights W_g (and optional learned noise W_noise): "
               "top-k experts per token and their softmax gates. JSON in, JSON out.");
  sub->add_option("-i,--input", o->input,
                  "JSON file, or - for standard input: {\"X\": [[..]], \"W_g\": [[..]], \"k\": 2, "
                  "\"b_g\": [..]?, \"W_noise\": [[..]]?, \"N\": [[..]]?, \"noise_scale\": "
                  "\"softplus\"|\"linear\"?, \"tie_break\": \"high\"|\"low\"|\"torch\"?, "
                  "\"training\": true?, \"seed\": 0?, \"round\": 3?}")
      ->required();
  sub->footer(
      "Output: {\"gates\": [[..]] (T×E, dense), \"indices\": [[..]] (T×k, best first), "
      "\"weights\": [[..]] (T×k)}.\nNo W_noise: no noise. W_noise without N: ε drawn from the "
      "seed (Philox, keyed by seed and token). Exit status 2 on bad input.");
  sub->callback([o, &status] { status = run_route(*o); });
}

}  // namespace moe::cli
