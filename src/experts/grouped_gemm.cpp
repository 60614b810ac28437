#include "experts/grouped_gemm.hpp"

#include <algorithm>

#include "common/gemm.hpp"

namespace moe::detail {

namespace {
// Constants, never derived from the thread count (see the header). Tall tiles: oneDNN packs
// the tile's slice of B (up to K×256 floats) on every call, so a tile should bring as many
// rows as possible to it. 64-row tiles packed each 1 MiB slice of W1 eight times for a
// 512-row expert; 512-row tiles pack it once (B1 forward 357–376 ms → 278–308 ms,
// forward+backward 993–1214 → 826–917 ms on 2 threads, bench_layer).
constexpr int64_t kTileM = 512;
constexpr int64_t kTileN = 256;
}  // namespace

void GroupedGemm::run() {
  tiles_.clear();
  for (size_t i = 0; i < problems_.size(); ++i) {
    const GemmProblem& p = problems_[i];
    for (int64_t m0 = 0; m0 < p.M; m0 += kTileM)
      for (int64_t n0 = 0; n0 < p.N; n0 += kTileN)
        tiles_.push_back(
            Tile{static_cast<int32_t>(i), m0, std::min(kTileM, p.M - m0), n0, std::min(kTileN, p.N - n0)});
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles_.size());
  const GemmProblem* probs = problems_.data();
  const Tile* tiles = tiles_.data();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_tiles; ++i) {
    const Tile& t = tiles[i];
    const GemmProblem& p = probs[t.problem];
    const float* A = p.trans_a ? p.A + t.m0 : p.A + t.m0 * p.lda;
    const float* B = p.trans_b ? p.B + t.n0 * p.ldb : p.B + t.n0;
    gemm_f32_serial(p.trans_a, p.trans_b, t.m, t.n, p.K, 1.0f, A, p.lda, B, p.ldb, p.beta,
                    p.C + t.m0 * p.ldc + t.n0, p.ldc);
  }
  problems_.clear();
}

}  // namespace moe::detail
