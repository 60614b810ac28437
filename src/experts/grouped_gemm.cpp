#include "experts/grouped_gemm.hpp"

#include <algorithm>
#include <type_traits>

#include "common/bf16.hpp"
#include "common/check.hpp"
#include "common/gemm.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/activation.hpp"

namespace moe::detail {

namespace {
// Constants, never derived from the thread count (see the header). Large tiles: each tile is
// one serial sgemm that packs its slice of B (K × tile columns) and its slice of A (tile
// rows × K) on every call, so the fewer tiles share an operand, the fewer packings. History
// (B1 on 2 threads): 64×256 → 512×256 tiles took forward from 357–376 to 278–308 ms
// (W1's slices packed once instead of eight times per 512-row expert); 512×256 → 1024×1024
// (B1's experts hold at most 640 rows: one row tile per expert, A packed twice instead of
// eight times for W1) took forward 373 → 329 ms (×0.885) and forward+backward 941 → 853 ms
// (×0.905), medians of 16 and 10 interleaved rounds in one process; E8 (~1024 rows per
// expert) ×0.894, B2 ×0.922. 1024×512 gave ×0.94, 1024×2048 and 2048×2048 the same as
// 1024×1024, balanced row splits (530 rows as 2×265 rather than 512 + 18) nothing
// measurable. The cost: fewer tiles to share among threads (B1's W2 pass has 16), which
// matters beyond a few threads.
static_assert(KernelF32::kTileM == 1024 && KernelF32::kTileN == 1024);
// bf16 products. Measured with oneDNN's bf16 gemm (which packs its operands per call like
// sgemm), before the weights were packed once: on B1's shapes 512×512 … 512×2048 tiles ran
// within 3% of each other and of oneDNN threading a whole expert (405–420 GFLOP/s on 2
// threads); at decode (one row, 4096×14336) wider tiles paid: 7.4 ms at 2048 columns, 11.8 ms
// at 1024, 23 ms at 256 (fewer calls, longer streams). The packed kernel (Bp) keeps them: its
// row blocks reuse a 64-column panel from L2 whatever the tile, and a tile's panels prefetch
// one another, so wide tiles suit it too. Tiles start on a panel (kTileNBf16 % 64 == 0).
static_assert(KernelBf16Packed::kTileM == 512 && KernelBf16Packed::kTileN == 2048);
static_assert(KernelBf16Packed::kTileN % kPanelCols == 0, "packed products start tiles on a panel");

template <typename F>
void with_act(Activation a, F&& f) {
  switch (a) {
    case Activation::relu: return f(std::integral_constant<Activation, Activation::relu>{});
    case Activation::gelu: return f(std::integral_constant<Activation, Activation::gelu>{});
    case Activation::silu: return f(std::integral_constant<Activation, Activation::silu>{});
  }
}

// apply_epilogue with every step rounded to bf16 (TileEpilogue::round_steps), in the order
// transformers' bf16 experts run them: the product; the bias added; the activation; for the
// glu, silu(gate) then ·up, or GPT-OSS's clamped form op by op (α·g, σ, g·σ, u + 1, the
// product). Clamps are exact. One loop per op, so that each vectorises.
template <class P>
void apply_epilogue_rounded(const P& p, int64_t m0, int64_t m, int64_t n0, int64_t n) {
  using Op = TileEpilogue::Op;
  const TileEpilogue& e = p.epi;
  const float* b = e.bias ? e.bias + n0 : nullptr;
  const float* b2 = e.bias2 ? e.bias2 + n0 : nullptr;
  auto linear = [n](float* c, const float* bias) {
    for (int64_t j = 0; j < n; ++j) c[j] = round_bf16(c[j]);
    if (bias)
      for (int64_t j = 0; j < n; ++j) c[j] = round_bf16(c[j] + bias[j]);
  };
  const float alpha = e.alpha, limit = e.limit;
  for (int64_t i = m0; i < m0 + m; ++i) {
    const int64_t o = i * p.ldc + n0;
    float* c = p.C + o;
    float* h = e.out ? e.out + o : nullptr;
    uint16_t* hb = e.out_bf16 ? e.out_bf16 + o : nullptr;
    linear(c, b);
    auto put = [&](auto&& act) {  // the fp32 output, the bf16 one, or both from one act
      if (h)
        for (int64_t j = 0; j < n; ++j) h[j] = act(j);
      if (hb && h)
        for (int64_t j = 0; j < n; ++j) hb[j] = to_bf16(h[j]);
      else if (hb)
        for (int64_t j = 0; j < n; ++j) hb[j] = to_bf16(act(j));
    };
    switch (e.op) {
      case Op::none:
      case Op::bias:
        break;
      case Op::glu: {
        float* c2 = p.C2 + o;
        linear(c2, b2);
        if (e.clamped)
          put([&](int64_t j) {
            const float g = std::min(c[j], limit);
            const float u = std::min(std::max(c2[j], -limit), limit);
            const float sg = round_bf16(sigmoid_f32(round_bf16(g * alpha)));
            return round_bf16(round_bf16(u + 1.0f) * round_bf16(g * sg));
          });
        else
          put([&](int64_t j) { return round_bf16(round_bf16(silu_f32(c[j])) * c2[j]); });
        break;
      }
      case Op::bias_act:
        with_act(e.act, [&](auto A) {
          put([&](int64_t j) { return round_bf16(act_forward(A.value, c[j])); });
        });
        break;
      case Op::bias_act_inplace:
        with_act(e.act, [&](auto A) {
          for (int64_t j = 0; j < n; ++j) c[j] = round_bf16(act_forward(A.value, c[j]));
        });
        break;
    }
  }
}

// The epilogue of rows [m0, m0+m), columns [n0, n0+n) of problem p. The activation is a
// template constant inside the loops so that they vectorise.
template <class P>
void apply_epilogue(const P& p, int64_t m0, int64_t m, int64_t n0, int64_t n) {
  using Op = TileEpilogue::Op;
  const TileEpilogue& e = p.epi;
  if (e.round_steps) return apply_epilogue_rounded(p, m0, m, n0, n);
  const float* b = e.bias ? e.bias + n0 : nullptr;
  auto rows = [&](auto&& f) {
    for (int64_t i = m0; i < m0 + m; ++i) f(i * p.ldc + n0);
  };
  switch (e.op) {
    case Op::none:
      break;
    case Op::glu: {
      const float* b2 = e.bias2 ? e.bias2 + n0 : nullptr;
      rows([&](int64_t o) {
        float* c = p.C + o;
        float* c2 = p.C2 + o;
        if (b)
          for (int64_t j = 0; j < n; ++j) c[j] += b[j];
        if (b2)
          for (int64_t j = 0; j < n; ++j) c2[j] += b2[j];
        float* h = e.out ? e.out + o : nullptr;
        uint16_t* hb = e.out_bf16 ? e.out_bf16 + o : nullptr;
        const float alpha = e.alpha, limit = e.limit;
        if (e.clamped) {
          if (h)
            for (int64_t j = 0; j < n; ++j) h[j] = clamped_swiglu_f32(c[j], c2[j], alpha, limit);
          if (hb)
            for (int64_t j = 0; j < n; ++j) hb[j] = to_bf16(clamped_swiglu_f32(c[j], c2[j], alpha, limit));
        } else {
          if (h)
            for (int64_t j = 0; j < n; ++j) h[j] = silu_f32(c[j]) * c2[j];
          if (hb)
            for (int64_t j = 0; j < n; ++j) hb[j] = to_bf16(silu_f32(c[j]) * c2[j]);
        }
      });
      break;
    }
    case Op::bias:
      if (b)
        rows([&](int64_t o) {
          float* c = p.C + o;
          for (int64_t j = 0; j < n; ++j) c[j] += b[j];
        });
      break;
    case Op::bias_act:
      with_act(e.act, [&](auto A) {
        rows([&](int64_t o) {
          float* c = p.C + o;
          float* h = e.out ? e.out + o : nullptr;
          uint16_t* hb = e.out_bf16 ? e.out_bf16 + o : nullptr;
          for (int64_t j = 0; j < n; ++j) {
            const float z = c[j] + (b ? b[j] : 0.0f);
            c[j] = z;
            const float a = act_forward(A.value, z);
            if (h) h[j] = a;
            if (hb) hb[j] = to_bf16(a);
          }
        });
      });
      break;
    case Op::bias_act_inplace:
      with_act(e.act, [&](auto A) {
        rows([&](int64_t o) {
          float* c = p.C + o;
          for (int64_t j = 0; j < n; ++j) c[j] = act_forward(A.value, c[j] + (b ? b[j] : 0.0f));
        });
      });
      break;
  }
}
// Rows [m0, m0+m) × columns [n0, n0+n) of C = op(A) · op(b) of problem p, on its kernel.
void run_tile(const GemmProblem<KernelF32>& p, const KernelF32::B& b, float* C, int64_t m0,
              int64_t m, int64_t n0, int64_t n) {
  const float* a = p.a.trans ? p.a.p + m0 : p.a.p + m0 * p.a.ld;
  const float* bt = b.trans ? b.p + n0 * b.ld : b.p + n0;
  gemm_f32_serial(p.a.trans, b.trans, m, n, p.K, 1.0f, a, p.a.ld, bt, b.ld, p.beta,
                  C + m0 * p.ldc + n0, p.ldc);
}
void run_tile(const GemmProblem<KernelBf16Packed>& p, const KernelBf16Packed::B& b, float* C,
              int64_t m0, int64_t m, int64_t n0, int64_t n) {
  gemm_bf16_packed_serial(m, n0, n, p.K, p.a.p + m0 * p.a.ld, p.a.ld, b, p.beta,
                          C + m0 * p.ldc + n0, p.ldc);
}

}  // namespace

const char* KernelF32::name() { return "sgemm (oneDNN, one serial call per tile)"; }
const char* KernelBf16Packed::name() { return gemm_bf16_packed_impl(); }
int64_t KernelBf16Packed::weight_size(int64_t K, int64_t N) { return packed_bf16_size(K, N); }

template <class Kernel>
void GroupedGemm::List<Kernel>::run() {
  if (problems.empty()) return;
  tiles.clear();
  for (size_t i = 0; i < problems.size(); ++i) {
    const GemmProblem<Kernel>& p = problems[i];
    for (int64_t m0 = 0; m0 < p.M; m0 += Kernel::kTileM)
      for (int64_t n0 = 0; n0 < p.N; n0 += Kernel::kTileN)
        tiles.push_back(Tile{static_cast<int32_t>(i), m0, std::min(Kernel::kTileM, p.M - m0), n0,
                             std::min(Kernel::kTileN, p.N - n0)});
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const GemmProblem<Kernel>* probs = problems.data();
  const Tile* ts = tiles.data();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_tiles; ++i) {
    const Tile& t = ts[i];
    const GemmProblem<Kernel>& p = probs[t.problem];
    run_tile(p, p.b, p.C, t.m0, t.m, t.n0, t.n);
    if (p.epi.op == TileEpilogue::Op::glu) run_tile(p, p.b2, p.C2, t.m0, t.m, t.n0, t.n);
    apply_epilogue(p, t.m0, t.m, t.n0, t.n);
  }
  problems.clear();
}

void GroupedGemm::run() {
  f32_.run();
  bf16_.run();
}

}  // namespace moe::detail
