// Many independent GEMMs (one per expert) run as one parallel loop over fixed-size output
// tiles. Each tile is a serial oneDNN sgemm over the full reduction dimension, and the tiling
// depends only on the shapes, never on the thread count: the results are bit-identical for
// any OMP_NUM_THREADS (the same argument as common/gemm.hpp).
#pragma once
#include <cstdint>
#include <vector>

namespace moe::detail {

// C (M, N) = op(A) · op(B) + beta·C, row-major, op(A) (M, K), op(B) (K, N).
struct GemmProblem {
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  const float* A = nullptr;
  int64_t lda = 0;
  const float* B = nullptr;
  int64_t ldb = 0;
  float beta = 0.0f;
  float* C = nullptr;
  int64_t ldc = 0;
};

// Reusable: the problem and tile lists keep their storage across calls.
class GroupedGemm {
 public:
  void clear() { problems_.clear(); }
  void add(const GemmProblem& p) {
    if (p.M > 0 && p.N > 0) problems_.push_back(p);
  }
  void run();  // runs and clears the list

 private:
  struct Tile {
    int32_t problem;
    int64_t m0, m, n0, n;
  };
  std::vector<GemmProblem> problems_;
  std::vector<Tile> tiles_;
};

}  // namespace moe::detail
