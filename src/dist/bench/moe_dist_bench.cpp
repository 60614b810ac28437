// moe_dist_bench: the communication share of an expert-parallel training step, measured.
// Run it under mpirun:
//   mpirun --allow-run-as-root --oversubscribe -np 4 build/bin/moe_dist_bench --tokens 512
// Each rank runs forward + backward on its own tokens; the program reports, per step, the
// wall time, the time inside MPI (waiting for slower ranks included), the bytes of token rows
// each rank sends to the others, and the model of docs/scaling.md for the same shape.
// --json prints one JSON object (rank 0) for `moe bench` to read.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moe/dist.hpp"

namespace {

struct Args {
  int64_t tokens = 256, d = 256, experts = 8, k = 2, dff = 512, steps = 10, warmup = 2;
  bool json = false;
};

[[noreturn]] void usage(int rank, const char* why) {
  if (rank == 0)
    std::fprintf(stderr,
                 "%s\nusage: moe_dist_bench [--tokens T_per_rank] [--d d_model] [--experts E] "
                 "[--k k] [--dff d_ff] [--steps N] [--json]\n",
                 why);
  MPI_Finalize();
  std::exit(2);
}

Args parse(int argc, char** argv, int rank) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto num = [&](int64_t& v) {
      if (i + 1 >= argc) usage(rank, ("missing value after " + s).c_str());
      char* end = nullptr;
      v = std::strtoll(argv[++i], &end, 10);
      if (*end || v < 0) usage(rank, (s + ": not a non-negative integer").c_str());
    };
    if (s == "--tokens") num(a.tokens);
    else if (s == "--d") num(a.d);
    else if (s == "--experts") num(a.experts);
    else if (s == "--k") num(a.k);
    else if (s == "--dff") num(a.dff);
    else if (s == "--steps") num(a.steps);
    else if (s == "--json") a.json = true;
    else if (s == "--help" || s == "-h") usage(rank, "moe_dist_bench: communication share of expert parallelism");
    else usage(rank, ("unknown argument " + s).c_str());
  }
  if (a.steps < 1) usage(rank, "--steps: must be at least 1");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const Args a = parse(argc, argv, rank);
  try {
    moe::MoEConfig cfg;
    cfg.d_model = a.d;
    cfg.n_experts = a.experts;
    cfg.k = a.k;
    cfg.d_ff = a.dff;
    cfg.router_init_std = 0.1f;
    cfg.noise = moe::Noise::none;
    moe::dist::ExpertParallelMoE layer(cfg, MPI_COMM_WORLD);
    const int64_t T = a.tokens, d = a.d;
    std::vector<float> x(static_cast<size_t>(T * d)), y(x.size()), dx(x.size()), dy(x.size());
    // Different tokens on every rank, so routing spreads over the experts.
    uint32_t s = 12345u + 77u * static_cast<uint32_t>(rank);
    for (auto& v : x) v = static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = 1e-3f * static_cast<float>(i % 7);

    double wall = 0.0;
    for (int64_t it = 0; it < a.warmup + a.steps; ++it) {
      if (it == a.warmup) layer.comm_stats().reset();
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = std::chrono::steady_clock::now();
      moe::ForwardOptions opt;
      opt.step = static_cast<uint64_t>(it);
      layer.forward(y.data(), x.data(), T, opt);
      layer.backward(dx.data(), dy.data());
      if (it >= a.warmup)
        wall += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const moe::dist::CommStats& cs = layer.comm_stats();
    const double n = static_cast<double>(a.steps);
    // Per rank, per step; then the mean over ranks (the share) and the max (the bytes).
    double mine[4] = {wall / n, cs.seconds / n, static_cast<double>(cs.row_bytes_sent) / n,
                      static_cast<double>(cs.control_bytes) / n};
    double sum[4], mx[4];
    MPI_Reduce(mine, sum, 4, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    MPI_Reduce(mine, mx, 4, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      const double step_s = sum[0] / P, mpi_s = sum[1] / P, rows_b = sum[2] / P, ctl_b = sum[3] / P;
      // Model (docs/scaling.md): rows leaving a rank per step, with uniform routing and no
      // drops, 4 bytes · T·k·(d + d_out + d_out + d) · (P−1)/P.
      const double model_b = 4.0 * static_cast<double>(T * a.k * 4 * d) * (P - 1) / P;
      if (a.json) {
        std::printf(
            "{\"P\": %d, \"tokens_per_rank\": %lld, \"d_model\": %lld, \"n_experts\": %lld, "
            "\"k\": %lld, \"d_ff\": %lld, \"steps\": %lld, \"step_seconds\": %.6g, "
            "\"mpi_seconds\": %.6g, \"comm_share\": %.4f, \"row_bytes_sent_per_rank\": %lld, "
            "\"row_bytes_model\": %lld, \"control_bytes_per_rank\": %lld}\n",
            P, static_cast<long long>(T), static_cast<long long>(d),
            static_cast<long long>(a.experts), static_cast<long long>(a.k),
            static_cast<long long>(a.dff), static_cast<long long>(a.steps), step_s, mpi_s,
            mpi_s / step_s,
            // Byte counts as whole numbers (%.6g wrote 1101824 as 1.10182e+06).
            std::llround(rows_b), std::llround(model_b), std::llround(ctl_b));
      } else {
        std::printf("moe_dist_bench: P=%d T/rank=%lld d=%lld E=%lld k=%lld d_ff=%lld, %lld steps\n",
                    P, static_cast<long long>(T), static_cast<long long>(d),
                    static_cast<long long>(a.experts), static_cast<long long>(a.k),
                    static_cast<long long>(a.dff), static_cast<long long>(a.steps));
        std::printf("  step (fwd+bwd)     %10.3f ms (slowest rank %.3f ms)\n", 1e3 * step_s,
                    1e3 * mx[0]);
        std::printf("  inside MPI         %10.3f ms  = %.1f%% of the step (mean over ranks)\n",
                    1e3 * mpi_s, 100.0 * mpi_s / step_s);
        std::printf("  rows sent / rank   %10.0f B   (model, uniform routing: %.0f B)\n", rows_b,
                    model_b);
        std::printf("  control / rank     %10.0f B   (counts, flags, router grads, stats)\n",
                    ctl_b);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: error: %s\n", rank, e.what());
    MPI_Finalize();
    return 1;
  }
  MPI_Finalize();
  return 0;
}
