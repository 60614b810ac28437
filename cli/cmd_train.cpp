// `moe train`: placeholder until the layer lands.
#include <iostream>
#include <memory>

#include "commands.hpp"

namespace moe::cli {

void add_train_command(CLI::App& app, int& status) {
  CLI::App* sub = app.add_subcommand("train", "Train an MoE model on the embedded default task");
  sub->callback([&status] {
    std::cerr << "moe train: not implemented yet\n";
    status = 1;
  });
}

}  // namespace moe::cli
