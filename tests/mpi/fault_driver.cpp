// A program that fails on purpose, for tests/mpi/expect_failure.sh: each mode makes one rank
// misbehave while the others are inside (or about to enter) a collective of the layer. The
// test is that every rank ends, non-zero, with the message — never a hang (ctest's TIMEOUT
// turns a hang into a failure).
//   nan:   rank 1 feeds a NaN; every rank must throw "rank 1: x: non-finite value …" and the
//          driver exits 1 on every rank, printing it.
//   abort: rank 1 gives up with moe::dist::abort_all while the others wait in forward.
//   exit:  rank 1 leaves with exit(3), without MPI_Finalize, while the others wait.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "moe/dist.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string mode = argc > 1 ? argv[1] : "nan";
  try {
    moe::MoEConfig cfg;
    cfg.d_model = 8;
    cfg.n_experts = 4;
    cfg.k = 2;
    cfg.d_ff = 16;
    cfg.router_init_std = 0.5f;
    moe::dist::ExpertParallelMoE layer(cfg, MPI_COMM_WORLD);
    const int64_t T = 4;
    std::vector<float> x(static_cast<size_t>(T * cfg.d_model), 0.25f), y(x.size());
    if (rank == 1) {
      if (mode == "nan") x[2 * cfg.d_model + 3] = NAN;
      if (mode == "abort") moe::dist::abort_all(MPI_COMM_WORLD, "error: simulated failure");
      if (mode == "exit") {
        std::fprintf(stderr, "rank 1: error: leaving without a word\n");
        std::exit(3);
      }
    }
    layer.forward(y.data(), x.data(), T);
    std::vector<float> dx(x.size());
    layer.backward(dx.data(), y.data());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: error: %s\n", rank, e.what());
    MPI_Finalize();
    return 1;
  }
  MPI_Finalize();
  return 0;
}
