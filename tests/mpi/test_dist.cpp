// Equivalence of the expert-parallel layer with the single-process one, run under mpirun.
//
// Every rank builds the same global batch, runs MoELayer on all of it (the oracle), then runs
// ExpertParallelMoE on its own slice and compares its slice of every result. What must be
// bit-identical and what may differ (and by how much) is argued in docs/scaling.md; the
// checks below state it per quantity:
//   exact: y, dx, expert outputs and every expert gradient, router indices/weights, stats
//          (loads, drops), dprobs/dlogits-driven quantities through dx;
//   1e-6 normwise relative: the router's weight gradients (a sum over ranks of partial sums,
//          where the single process sums over all tokens at once) and, after training steps,
//          everything downstream of them;
//   1e-12 relative: aux_loss and z_loss (double sums split by rank).
// A plain driver (not GoogleTest): every rank runs every case, failures are counted, and the
// exit status is non-zero on every rank if any rank failed.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moe/dist.hpp"
#include "moe/layer.hpp"

namespace {

int g_rank = 0, g_size = 1, g_fail = 0, g_checks = 0;
// Tolerances (max|a − b| ≤ tol·max|b|): the router's weight gradients are sums over ranks of
// partial sums; after a training step everything inherits their rounding.
constexpr double kRouterGradTol = 1e-6;
constexpr double kAfterStepTol = 1e-5;
double worst_router_grad = 0.0, worst_after_step0 = 0.0;
std::string g_case;

void fail(const std::string& what) {
  ++g_fail;
  std::fprintf(stderr, "[rank %d] FAIL %s: %s\n", g_rank, g_case.c_str(), what.c_str());
}

// Bit-for-bit equality of float arrays, reporting the first difference.
void expect_exact(const std::string& what, const float* a, const float* b, int64_t n) {
  ++g_checks;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t ua, ub;
    std::memcpy(&ua, &a[i], 4);
    std::memcpy(&ub, &b[i], 4);
    if (ua != ub || std::isnan(a[i]) || std::isnan(b[i])) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s not bit-identical at %lld of %lld: %.9g vs %.9g",
                    what.c_str(), static_cast<long long>(i), static_cast<long long>(n), a[i],
                    b[i]);
      fail(buf);
      return;
    }
  }
}

// max|a − b| ≤ tol · max|b|, NaN failing; returns the observed ratio.
double expect_close(const std::string& what, const float* a, const float* b, int64_t n,
                    double tol) {
  ++g_checks;
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
      fail(what + " has a non-finite value");
      return INFINITY;
    }
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  const double r = den > 0 ? num / den : num;
  if (r > tol) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: relative error %.3g > %.1g", what.c_str(), r, tol);
    fail(buf);
  }
  return r;
}

void expect_close_d(const std::string& what, double a, double b, double tol) {
  ++g_checks;
  const double r = std::abs(a - b) / std::max(std::abs(b), 1e-300);
  if (!(r <= tol) && a != b) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: %.17g vs %.17g (relative %.3g > %.1g)", what.c_str(), a,
                  b, r, tol);
    fail(buf);
  }
}

void expect_true(const std::string& what, bool ok) {
  ++g_checks;
  if (!ok) fail(what);
}

std::vector<float> random_array(int64_t n, uint32_t seed, float scale) {
  std::mt19937 gen(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = scale * (static_cast<float>(gen() >> 8) * (1.0f / 16777216.0f) - 0.5f);
  return v;
}

bool is_router(const std::string& n) { return n == "W_g" || n == "b_g" || n == "W_noise"; }

struct Case {
  std::string name;
  moe::MoEConfig cfg;
  std::function<int64_t(int r, int P)> tokens;  // tokens on rank r
  int steps = 1;           // forward/backward/SGD steps
  bool training = true;
  bool expect_drops = false;
  float lr = 0.05f;
};

// Runs one case: oracle on the whole batch vs the distributed layer on slices.
void run_case(const Case& c) {
  g_case = c.name;
  const moe::MoEConfig& cfg = c.cfg;
  const int P = g_size, me = g_rank;
  std::vector<int64_t> Ts(static_cast<size_t>(P));
  int64_t Tg = 0, off = 0;
  for (int r = 0; r < P; ++r) {
    Ts[r] = c.tokens(r, P);
    if (r < me) off += Ts[r];
    Tg += Ts[r];
  }
  const int64_t T = Ts[me], d = cfg.d_model, Do = cfg.out_dim(), E = cfg.n_experts;

  moe::MoELayer ref(cfg);
  moe::dist::ExpertParallelMoE dist(cfg, MPI_COMM_WORLD);
  const int64_t e0 = dist.expert_begin();

  for (int step = 0; step < c.steps; ++step) {
    const std::string at = " (step " + std::to_string(step) + ")";
    const auto X = random_array(Tg * d, 1000u + static_cast<uint32_t>(step), 4.0f);
    const auto dY = random_array(Tg * Do, 2000u + static_cast<uint32_t>(step), 2.0f);
    moe::ForwardOptions opt;
    opt.training = c.training;
    opt.step = static_cast<uint64_t>(step);
    opt.token_offset = 0;

    std::vector<float> yref(static_cast<size_t>(Tg * Do)), dxref(static_cast<size_t>(Tg * d));
    ref.zero_grad();
    ref.forward(yref.data(), X.data(), Tg, opt);
    ref.backward(dxref.data(), dY.data());

    std::vector<float> y(static_cast<size_t>(T * Do)), dx(static_cast<size_t>(T * d));
    dist.zero_grad();
    dist.forward(y.data(), X.data() + off * d, T, opt);
    dist.backward(dx.data(), dY.data() + off * Do);

    // Zero-trust: a comparison of zeros proves nothing.
    double ysum = 0;
    for (float v : yref) ysum += std::abs(v);
    expect_true("oracle output is not all zero" + at, Tg == 0 || ysum > 0);

    const auto& rs = ref.routing();
    const auto& ds = dist.routing();
    std::vector<float> ri(rs.indices.begin() + off * cfg.k, rs.indices.begin() + (off + T) * cfg.k);
    std::vector<float> di(ds.indices.begin(), ds.indices.end());
    expect_exact("router indices" + at, di.data(), ri.data(), T * cfg.k);
    // Step 0 starts from the same parameters: bit-identical. Later steps start from router
    // weights that differ in the last bits (their gradients are sums over ranks), so from
    // then on the outputs are compared within kAfterStepTol.
    auto same = [&](const std::string& what, const float* got, const float* want, int64_t n) {
      if (step == 0)
        expect_exact(what + at, got, want, n);
      else
        worst_after_step0 = std::max(worst_after_step0, expect_close(what + at, got, want, n, kAfterStepTol));
    };
    same("router weights", ds.weights.data(), rs.weights.data() + off * cfg.k, T * cfg.k);
    same("y", y.data(), yref.data() + off * Do, T * Do);
    same("dx", dx.data(), dxref.data() + off * d, T * d);

    const auto& a = dist.stats();
    const auto& b = ref.stats();
    expect_true("stats.tokens" + at, a.tokens == b.tokens);
    expect_true("stats.capacity" + at, a.capacity == b.capacity);
    expect_true("stats.load_before" + at, a.load_before == b.load_before);
    expect_true("stats.load_after" + at, a.load_after == b.load_after);
    expect_true("stats.dropped_assignments" + at, a.dropped_assignments == b.dropped_assignments);
    expect_true("stats.dropped_tokens" + at, a.dropped_tokens == b.dropped_tokens);
    expect_true("stats.experts_evaluated" + at, a.experts_evaluated == b.experts_evaluated);
    if (c.expect_drops && step == 0)
      expect_true("the case drops assignments (capacity path exercised)", b.dropped_assignments > 0);
    expect_close_d("aux_loss" + at, dist.aux_loss(), ref.aux_loss(), step == 0 ? 1e-12 : kAfterStepTol);
    expect_close_d("z_loss" + at, dist.z_loss(), ref.z_loss(), step == 0 ? 1e-12 : kAfterStepTol);

    for (const auto& n : ref.parameter_names()) {
      const moe::Tensor& gr = ref.grad(n);
      const moe::Tensor& gd = dist.grad(n);
      if (is_router(n)) {
        worst_router_grad = std::max(worst_router_grad, expect_close("grad " + n + at, gd.ptr(), gr.ptr(), gr.numel(), step == 0 ? kRouterGradTol : kAfterStepTol));
      } else {
        const int64_t per = gr.numel() / E;
        same("grad " + n, gd.ptr(), gr.ptr() + e0 * per, gd.numel());
      }
    }

    // One SGD step on both, the same arithmetic: w -= lr·g.
    for (const auto& n : ref.parameter_names()) {
      moe::Tensor& wr = ref.param(n);
      const moe::Tensor& gr = ref.grad(n);
      for (int64_t i = 0; i < wr.numel(); ++i) wr.data[i] -= c.lr * gr.data[i];
      moe::Tensor& wd = dist.param(n);
      const moe::Tensor& gd = dist.grad(n);
      for (int64_t i = 0; i < wd.numel(); ++i) wd.data[i] -= c.lr * gd.data[i];
    }
  }
  // After training, parameters agree within the router gradients' tolerance (their rounding
  // difference feeds every later step).
  for (const auto& n : ref.parameter_names()) {
    const moe::Tensor& wr = ref.param(n);
    const moe::Tensor& wd = dist.param(n);
    const int64_t first = is_router(n) ? 0 : e0 * (wr.numel() / E);
    if (c.steps == 1 && !is_router(n))
      expect_exact("param " + n + " after one step", wd.ptr(), wr.ptr() + first, wd.numel());
    else
      worst_after_step0 = std::max(worst_after_step0,
          expect_close("param " + n + " after " + std::to_string(c.steps) + " steps", wd.ptr(),
                       wr.ptr() + first, wd.numel(), kAfterStepTol));
  }
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto base = [] {
    moe::MoEConfig c;
    c.d_model = 12;
    c.n_experts = 8;
    c.k = 2;
    c.d_ff = 20;
    c.router_init_std = 0.5f;
    c.seed = 7;
    c.aux_alpha = 0.01f;
    return c;
  };
  auto even = [](int64_t n) { return [n](int, int) { return n; }; };
  // Uneven: 5, 9, 13, 17 … tokens; rank 1 of 4 holds none.
  auto uneven = [](int r, int P) -> int64_t { return P >= 4 && r == 1 ? 0 : 5 + 4 * r; };

  {
    Case c{"mlp dropless learned noise", base(), even(16)};
    v.push_back(c);
  }
  {
    Case c{"mlp cf=1.0 position, uneven tokens", base(), uneven};
    c.cfg.capacity_factor = 1.0;
    c.expect_drops = true;
    v.push_back(c);
  }
  {
    Case c{"swiglu cf=0.5 probs, fixed noise", base(), even(11)};
    c.cfg.expert = moe::ExpertKind::swiglu;
    c.cfg.capacity_factor = 0.5;
    c.cfg.drop_policy = moe::DropPolicy::probs;
    c.cfg.noise = moe::Noise::fixed;
    c.expect_drops = true;
    v.push_back(c);
  }
  {
    Case c{"linear_relu k=1 residual z-loss, E=6 uneven split", base(), uneven};
    c.cfg.expert = moe::ExpertKind::linear_relu;
    c.cfg.k = 1;
    c.cfg.n_experts = 6;
    c.cfg.residual = true;
    c.cfg.z_alpha = 0.001f;
    c.cfg.router_bias = true;
    c.cfg.capacity_factor = 1.25;
    v.push_back(c);
  }
  {
    Case c{"mlp gelu normalize_by_k, evaluation (no noise)", base(), even(9)};
    c.cfg.activation = moe::Activation::gelu;
    c.cfg.normalize_by_k = true;
    c.training = false;
    v.push_back(c);
  }
  {
    Case c{"mlp silu k=3 cf=0.75, 5 SGD steps", base(), uneven};
    c.cfg.activation = moe::Activation::silu;
    c.cfg.k = 3;
    c.cfg.capacity_factor = 0.75;
    c.cfg.z_alpha = 0.001f;
    c.steps = 5;
    c.expect_drops = true;
    v.push_back(c);
  }
  {
    Case c{"swiglu precision bf16 cf=1.25, 3 SGD steps", base(), uneven};
    c.cfg.expert = moe::ExpertKind::swiglu;
    c.cfg.precision = moe::Precision::bf16;
    c.cfg.capacity_factor = 1.25;
    c.steps = 3;
    v.push_back(c);
  }
  {
    Case c{"swiglu tie_break=low, E=3 < P (ranks without experts)", base(), even(6)};
    c.cfg.expert = moe::ExpertKind::swiglu;
    c.cfg.n_experts = 3;
    c.cfg.tie_break = moe::TieBreak::low;
    c.cfg.noise = moe::Noise::none;
    v.push_back(c);
  }
  return v;
}

// precision int8 and the low-bit ones (evaluation only): the local experts get exactly the rows
// MoELayer gives them (so the same kernels and roundings) and quantize the same weights, so y is
// bit-identical; backward is refused as in MoELayer.
void run_int8_case(moe::Precision precision) {
  g_case = std::string("swiglu precision ") + moe::to_string(precision) +
           ", evaluation, uneven tokens";
  moe::MoEConfig cfg;
  cfg.d_model = 12;
  cfg.n_experts = 8;
  cfg.k = 2;
  cfg.d_ff = 20;
  cfg.router_init_std = 0.5f;
  cfg.seed = 7;
  cfg.expert = moe::ExpertKind::swiglu;
  cfg.precision = precision;
  const int P = g_size, me = g_rank;
  int64_t Tg = 0, off = 0;
  for (int r = 0; r < P; ++r) {
    const int64_t n = 3 + 2 * r;
    if (r < me) off += n;
    Tg += n;
  }
  const int64_t T = 3 + 2 * me, d = cfg.d_model;
  moe::MoELayer ref(cfg);
  moe::dist::ExpertParallelMoE dist(cfg, MPI_COMM_WORLD);
  const auto X = random_array(Tg * d, 4242u, 4.0f);
  moe::ForwardOptions opt;
  opt.training = false;
  std::vector<float> yref(static_cast<size_t>(Tg * d)), y(static_cast<size_t>(T * d));
  ref.forward(yref.data(), X.data(), Tg, opt);
  dist.forward(y.data(), X.data() + off * d, T, opt);
  double ysum = 0;
  for (float v : yref) ysum += std::abs(v);
  expect_true("int8 oracle output is not all zero", ysum > 0);
  expect_exact("int8 y", y.data(), yref.data() + off * d, T * d);
  bool refused = false;
  try {
    dist.backward(y.data(), y.data());
  } catch (const moe::Error& e) {
    refused = std::string(e.what()).find("precision") != std::string::npos;
  }
  expect_true("int8 backward refused, naming precision", refused);
}

// A failure on one rank must reach every rank as the same moe::Error, and leave the layer
// usable (every rank left the same collective the same way).
void run_fault_cases() {
  g_case = "NaN on the last rank";
  moe::MoEConfig cfg;
  cfg.d_model = 4;
  cfg.n_experts = 4;
  cfg.k = 2;
  cfg.d_ff = 8;
  cfg.router_init_std = 0.5f;
  moe::dist::ExpertParallelMoE layer(cfg, MPI_COMM_WORLD);
  const int64_t T = 3;
  auto x = random_array(T * cfg.d_model, 5, 1.0f);
  if (g_rank == g_size - 1) x[1 * cfg.d_model + 2] = NAN;
  std::vector<float> y(static_cast<size_t>(T * cfg.d_model));
  std::string msg;
  try {
    layer.forward(y.data(), x.data(), T);
  } catch (const moe::Error& e) {
    msg = e.what();
  }
  const std::string want = "rank " + std::to_string(g_size - 1) + ": x: non-finite value";
  expect_true("every rank gets '" + want + "...', got '" + msg + "'", msg.rfind(want, 0) == 0);
  // Still usable after an agreed failure.
  if (g_rank == g_size - 1) x[1 * cfg.d_model + 2] = 0.5f;
  layer.forward(y.data(), x.data(), T);
  std::vector<float> dx(x.size());
  layer.backward(dx.data(), y.data());

  g_case = "negative T on rank 0";
  msg.clear();
  try {
    layer.forward(y.data(), x.data(), g_rank == 0 ? -1 : T);
  } catch (const moe::Error& e) {
    msg = e.what();
  }
  expect_true("every rank gets rank 0's 'T: must be >= 0', got '" + msg + "'",
              msg.rfind("rank 0: T: must be >= 0", 0) == 0);

  g_case = "config differs between ranks";
  msg.clear();
  moe::MoEConfig other = cfg;
  if (g_rank == g_size - 1) other.seed = 99;
  try {
    moe::dist::ExpertParallelMoE bad(other, MPI_COMM_WORLD);
  } catch (const moe::Error& e) {
    msg = e.what();
  }
  expect_true("every rank learns that seed differs, got '" + msg + "'",
              msg.find("seed differs between rank 0 and rank") != std::string::npos);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  try {
    for (const auto& c : cases()) run_case(c);
    for (auto p : {moe::Precision::int8, moe::Precision::int4, moe::Precision::mxfp4,
                   moe::Precision::fp8})
      run_int8_case(p);
    run_fault_cases();
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  int fails = 0;
  MPI_Allreduce(&g_fail, &fails, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &worst_router_grad, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &worst_after_step0, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (g_rank == 0)
    std::printf("test_dist: P=%d, %d checks per rank, %d failures over all ranks; worst "
                "relative error over ranks: router grads %.2g, after step 0 %.2g\n",
                g_size, g_checks, fails, worst_router_grad, worst_after_step0);
  MPI_Finalize();
  return fails == 0 ? 0 : 1;
}
