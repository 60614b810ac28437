// `moe bench`: expert parallelism on loopback (moe_dist_bench under mpirun).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <omp.h>
#include <unistd.h>

#include "bench.hpp"
#include "moe/error.hpp"
#include "moe/router.hpp"

namespace moe::cli::bench {

// build/bin/moe_dist_bench beside this executable, or "" when it was not built (no MPI).
std::string dist_bench_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  std::string exe(buf, static_cast<size_t>(n));
  const std::string path = exe.substr(0, exe.find_last_of('/') + 1) + "moe_dist_bench";
  return access(path.c_str(), X_OK) == 0 ? path : "";
}

DistResult run_dist(int P, bool quick) {
  DistResult d;
  d.P = P;
  const std::string bin = dist_bench_path();
  if (bin.empty()) {
    d.note = "n/a (moe_dist_bench not built: no MPI)";
    return d;
  }
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
    d.note = "n/a (mpirun not found)";
    return d;
  }
  // One OpenMP thread per rank: P ranks share the machine's cores.
  const std::string cmd = "OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np " +
                          std::to_string(P) + " " + shell_quote(bin) + " --json" +
                          (quick ? " --tokens 64 --d 64 --dff 128 --steps 3" : "") +
                          " 2>/dev/null";
  int rc = 0;
  const json res = run_json_command(cmd, rc);
  if (rc == -1) {
    d.note = "n/a (could not start mpirun)";
    return d;
  }
  if (rc != 0 || res.is_discarded() || !res.contains("comm_share")) {
    d.note = "n/a (mpirun failed, status " + std::to_string(rc) + ")";
    return d;
  }
  d.res = res;
  return d;
}

// The 1-minute load average: on a shared machine every time depends on it.

}  // namespace moe::cli::bench
