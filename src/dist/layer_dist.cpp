// The expert-parallel MoE layer (include/moe/dist.hpp). It reuses the single-process pieces
// as they are — router_forward/backward, build_capacity_plan, experts_forward/backward and
// the loss formulas of losses.hpp — and adds only what distribution needs: the global
// capacity decision, the index maps of the two exchanges, and the reductions.
//
// Row order is what makes the results equal to MoELayer's. MoELayer lays an expert's rows
// out rank-major, then token order: (choice j, global token t). Here rank r sends its kept
// rows in its local slot order (expert, j, t); the owner of expert e receives, from each
// source s, the runs (e, j) and copies them into (e, j, s, t) order. Because rank s holds the
// global tokens [off_s, off_s + T_s) and sources are taken in rank order, (j, s, t) is the
// global (j, t) order: each expert sees exactly MoELayer's rows in MoELayer's order, and the
// grouped GEMMs give the same bits. docs/scaling.md lists what is bit-identical and what is
// not (the router's weight gradient is a sum over ranks of partial sums).
#include <algorithm>
#include <cstring>
#include <map>

#include "common/check.hpp"
#include "dispatch/capacity_plan.hpp"
#include "dispatch/gather_combine.hpp"
#include "dist/comm.hpp"
#include "experts/experts.hpp"
#include "experts/int8.hpp"
#include "experts/precision.hpp"
#include "losses/losses.hpp"
#include "moe/dist.hpp"

namespace moe::dist {

using ::moe::detail::cat;

namespace {

bool is_router_param(const std::string& n) { return n == "W_g" || n == "b_g" || n == "W_noise"; }

// A run of rows that moves as one block between the exchange buffer (grouped by source rank)
// and the expert buffer (grouped by expert).
struct Run {
  int64_t xchg = 0;    // first row in the exchange buffer
  int64_t expert = 0;  // first row in the expert buffer
  int64_t n = 0;
};

void copy_runs_to_expert(float* dst, const float* src, const std::vector<Run>& runs,
                         int64_t width) {
  const int64_t nr = static_cast<int64_t>(runs.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < nr; ++i) {
    const Run& r = runs[i];
    std::memcpy(dst + r.expert * width, src + r.xchg * width,
                static_cast<size_t>(r.n * width) * sizeof(float));
  }
}

void copy_runs_to_xchg(float* dst, const float* src, const std::vector<Run>& runs,
                       int64_t width) {
  const int64_t nr = static_cast<int64_t>(runs.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < nr; ++i) {
    const Run& r = runs[i];
    std::memcpy(dst + r.xchg * width, src + r.expert * width,
                static_cast<size_t>(r.n * width) * sizeof(float));
  }
}

// A fingerprint of everything in the config that must agree across ranks.
std::vector<int64_t> config_fingerprint(const MoEConfig& c) {
  auto bits = [](double v) {
    int64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  };
  return {c.d_model, c.n_experts, c.k, int64_t(c.expert), c.hidden(), c.out_dim(),
          int64_t(c.activation), int64_t(c.expert_bias),
          c.capacity_factor ? bits(*c.capacity_factor) : -1, int64_t(c.drop_policy),
          int64_t(c.noise), int64_t(c.noise_scale), bits(c.noise_stddev), bits(c.aux_alpha),
          bits(c.z_alpha), int64_t(c.normalize_by_k), int64_t(c.residual), int64_t(c.tie_break),
          int64_t(c.router_bias), bits(c.router_init_std), static_cast<int64_t>(c.seed)};
}

const char* const kFingerprintNames[] = {
    "d_model", "n_experts", "k", "expert", "d_ff", "d_out", "activation", "expert_bias",
    "capacity_factor", "drop_policy", "noise", "noise_scale", "noise_stddev", "aux_alpha",
    "z_alpha", "normalize_by_k", "residual", "tie_break", "router_bias", "router_init_std",
    "seed"};

}  // namespace

struct ExpertParallelMoE::Impl {
  MoEConfig cfg;
  RouterConfig rcfg;
  MPI_Comm comm_dup = MPI_COMM_NULL;
  detail::Comm comm;
  ExpertShard shard;
  int64_t e0 = 0, El = 0;  // this rank's experts [e0, e0 + El)
  int64_t Emax = 0;        // most experts on any rank: the block width of the counts exchange
  ::moe::detail::ExpertShape shape;  // E = El

  std::vector<std::string> names;
  std::vector<Tensor> params, grads;
  std::map<std::string, size_t> index;

  // Saved by forward for backward.
  bool have_forward = false;
  int64_t T = 0, Tg = 0, off = 0;
  std::vector<int64_t> T_of_rank;  // (P)
  RouterState routing;
  ::moe::detail::CapacityPlan plan;  // local kept assignments, slots grouped by expert
  std::vector<float> x;              // (T, d)
  std::vector<int64_t> send_rows, recv_rows;  // (P) rows per peer, forward direction
  std::vector<int64_t> expert_off;            // (El + 1) rows of each local expert
  std::vector<Run> runs;
  std::vector<float> xg;    // (R_e, d)  rows of the local experts, expert order
  std::vector<float> a1, a3, hid, out;  // expert activations, expert order
  std::vector<float> xchg;  // exchange buffer, grouped by source/destination rank
  std::vector<float> ret;   // (n_kept, Do) expert outputs of this rank's assignments, slot order
  std::vector<int64_t> counts_j_e;  // (k, E) global assignments per (choice, expert)
  MoEStats stats;
  std::vector<double> psum;  // (E) Σ_t probs over the global batch, rank-ordered partials

  // Backward scratch.
  std::vector<float> dG, dout, dxg, dh, da3, dprobs, dlogits, rgrad;
  ::moe::detail::GroupedGemm gg;
  // The local experts' weights and operands in the layer's precision (as MoELayer).
  ::moe::detail::ExpertPrecision prec;

  const float* p(const char* name) const {
    auto it = index.find(name);
    return it == index.end() ? nullptr : params[it->second].ptr();
  }
  float* g(const char* name) {
    auto it = index.find(name);
    return it == index.end() ? nullptr : grads[it->second].ptr();
  }
  size_t find(const std::string& name) const {
    auto it = index.find(name);
    if (it == index.end()) {
      std::string known;
      for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
      throw Error(cat("parameter: unknown name '", name, "' (this layer has ", known, ")"));
    }
    return it->second;
  }
  RouterParams router_params() const { return {p("W_g"), p("b_g"), p("W_noise")}; }
  ::moe::detail::ExpertWeights expert_weights() const {
    return {p("W1"), p("b1"), p("W2"), p("b2"), p("W3")};
  }

  std::vector<int64_t> local_shape(const std::vector<int64_t>& full, const std::string& n) const {
    std::vector<int64_t> s = full;
    if (!is_router_param(n)) s[0] = El;
    return s;
  }

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl();

  void keep_position(std::vector<char>& keep, int64_t C);
  void keep_probs(std::vector<char>& keep, int64_t C);
  void build_local_plan(const std::vector<char>& keep);
  void forward(float* y, const float* x, int64_t T, const ForwardOptions& opt);
  void backward(float* dx, const float* dy);
};

// Position policy with global capacity: the slot of assignment (t, j) at expert e in the
// single-process order is Σ_{j'<j} (all ranks' choice-j' arrivals at e) + (earlier ranks'
// choice-j arrivals at e) + (this rank's earlier choice-j arrivals at e). Two reductions of
// (k, E) counts decide it; no token row or index is gathered.
void ExpertParallelMoE::Impl::keep_position(std::vector<char>& keep, int64_t C) {
  const int64_t E = cfg.n_experts, k = cfg.k;
  const int32_t* idx = routing.indices.data();
  std::vector<int64_t> local(static_cast<size_t>(k * E), 0), before(local.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) ++local[j * E + idx[t * k + j]];
  counts_j_e = local;
  comm.allreduce_sum(counts_j_e.data(), k * E);
  comm.exscan_sum(before.data(), local.data(), k * E);
  keep.assign(static_cast<size_t>(T * k), 1);
  if (C < 0) return;
  std::vector<int64_t> pos(static_cast<size_t>(E), 0);  // Σ_{j'<j} global arrivals
  for (int64_t j = 0; j < k; ++j) {
    std::vector<int64_t> cur(static_cast<size_t>(E), 0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t e = idx[t * k + j];
      keep[t * k + j] = pos[e] + before[j * E + e] + cur[e]++ < C ? 1 : 0;
    }
    for (int64_t e = 0; e < E; ++e) pos[e] += counts_j_e[j * E + e];
  }
}

// Probs policy: an expert keeps the C assignments of largest weight in the whole batch, which
// no local count can decide. Every rank gathers the (T_g, k) indices and weights (8 bytes per
// assignment, against 4·d per row moved) and runs the single-process plan on them.
void ExpertParallelMoE::Impl::keep_probs(std::vector<char>& keep, int64_t C) {
  const int64_t E = cfg.n_experts, k = cfg.k;
  std::vector<int64_t> Ts = T_of_rank;
  for (auto& v : Ts) v *= k;
  std::vector<int32_t> gidx(static_cast<size_t>(Tg * k));
  std::vector<float> gw(static_cast<size_t>(Tg * k));
  comm.allgatherv(gidx.data(), routing.indices.data(), Ts);
  comm.allgatherv(gw.data(), routing.weights.data(), Ts);
  ::moe::detail::CapacityPlan global;
  ::moe::detail::build_capacity_plan(global, gidx.data(), gw.data(), Tg, k, E, C,
                                     cfg.drop_policy);
  counts_j_e.assign(static_cast<size_t>(k * E), 0);
  for (int64_t a = 0; a < Tg * k; ++a) ++counts_j_e[(a % k) * E + gidx[a]];
  keep.resize(static_cast<size_t>(T * k));
  for (int64_t a = 0; a < T * k; ++a) keep[a] = global.src_to_dest[off * k + a] >= 0 ? 1 : 0;
}

// The local plan: this rank's kept assignments as dest slots grouped by expert, (j, t) order
// within an expert — pass 2 of build_capacity_plan, restricted to `keep`.
void ExpertParallelMoE::Impl::build_local_plan(const std::vector<char>& keep) {
  const int64_t E = cfg.n_experts, k = cfg.k, A = T * k;
  const int32_t* idx = routing.indices.data();
  plan.T = T;
  plan.k = k;
  plan.E = E;
  plan.load_before.assign(static_cast<size_t>(E), 0);
  plan.load_after.assign(static_cast<size_t>(E), 0);
  plan.offsets.assign(static_cast<size_t>(E + 1), 0);
  plan.cursor.assign(static_cast<size_t>(E), 0);
  plan.src_to_dest.resize(static_cast<size_t>(A));
  plan.dest_to_src.resize(static_cast<size_t>(A));
  for (int64_t a = 0; a < A; ++a) {
    ++plan.load_before[idx[a]];
    if (keep[a]) ++plan.load_after[idx[a]];
  }
  for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.load_after[e];
  plan.n_kept = plan.offsets[E];
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t a = t * k + j;
      if (!keep[a]) {
        plan.src_to_dest[a] = -1;
        continue;
      }
      const int64_t s = plan.offsets[idx[a]] + plan.cursor[idx[a]]++;
      plan.src_to_dest[a] = static_cast<int32_t>(s);
      plan.dest_to_src[s] = static_cast<int32_t>(a);
    }
  plan.dropped_tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t j = 0; j < k; ++j) any = any || keep[t * k + j];
    plan.dropped_tokens += any ? 0 : 1;
  }
}

void ExpertParallelMoE::Impl::forward(float* y, const float* xin, int64_t Tl,
                                      const ForwardOptions& opt) {
  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k, Do = cfg.out_dim();
  const int P = comm.size(), me = comm.rank();
  have_forward = false;

  // 1. Arguments, then the global numbering of tokens.
  comm.guarded([&] {
    MOE_REQUIRE(Tl >= 0, "T: must be >= 0, got ", Tl);
    MOE_REQUIRE(Tl * k <= int64_t{0x7fffffff}, "T: too many tokens for one batch, got ", Tl);
    MOE_REQUIRE(Tl == 0 || (xin && y), "forward: x and y must not be null");
    MOE_REQUIRE(!(opt.training && evaluation_only(cfg.precision)), "precision: '",
                to_string(cfg.precision),
                "' is for evaluation only; a training forward needs fp32 or bf16");
    for (size_t i = 0; i < names.size(); ++i) {
      MOE_REQUIRE(params[i].numel() == Tensor::numel_of(params[i].shape) &&
                      params[i].numel() == grads[i].numel(),
                  names[i], ": parameter was replaced with a wrong shape ",
                  shape_str(params[i].shape));
    }
  });
  T_of_rank.resize(static_cast<size_t>(P));
  comm.allgather(T_of_rank.data(), &Tl, 1);
  T = Tl;
  Tg = 0;
  off = 0;
  for (int p = 0; p < P; ++p) {
    if (p < me) off += T_of_rank[p];
    Tg += T_of_rank[p];
  }
  comm.guarded([&] {
    MOE_REQUIRE(Tg * k <= int64_t{0x7fffffff}, "T: too many tokens in the global batch, got ",
                Tg);
  });

  // 2. Route this rank's tokens. A bad token fails here, on its own rank, and every rank
  // learns of it before any exchange.
  comm.guarded([&] {
    NoiseSource ns;
    ns.eps = opt.noise;
    ns.seed = cfg.seed;
    ns.step = opt.step;
    ns.token_offset = opt.token_offset + off;
    router_forward(routing, xin, router_params(), rcfg, T, opt.training, ns);
  });

  // 3. Capacity, globally.
  const int64_t C = cfg.capacity(Tg);
  std::vector<char> keep;
  if (C >= 0 && cfg.drop_policy == DropPolicy::probs)
    keep_probs(keep, C);
  else
    keep_position(keep, C);
  build_local_plan(keep);
  const int64_t nk = plan.n_kept;

  // 4. Counts: for each peer p, rows per (p's local expert, choice) — (P, Emax, k).
  const int64_t blk = Emax * k;
  std::vector<int64_t> csend(static_cast<size_t>(P * blk), 0), crecv(csend.size());
  {
    const int32_t* idx = routing.indices.data();
    for (int64_t a = 0; a < T * k; ++a) {
      if (!keep[a]) continue;
      const int64_t e = idx[a];
      const int p = shard.owner(e);
      ++csend[p * blk + (e - shard.begin(p)) * k + a % k];
    }
  }
  comm.alltoall(crecv.data(), csend.data(), blk);
  send_rows.assign(static_cast<size_t>(P), 0);
  recv_rows.assign(static_cast<size_t>(P), 0);
  for (int p = 0; p < P; ++p)
    for (int64_t i = 0; i < blk; ++i) {
      send_rows[p] += csend[p * blk + i];
      recv_rows[p] += crecv[p * blk + i];
    }

  // The runs: in the exchange buffer, source s's rows sit in (e, j) blocks; in the expert
  // buffer, expert e's rows are (j, s) blocks.
  expert_off.assign(static_cast<size_t>(El + 1), 0);
  for (int64_t el = 0; el < El; ++el) {
    int64_t n = 0;
    for (int p = 0; p < P; ++p)
      for (int64_t j = 0; j < k; ++j) n += crecv[p * blk + el * k + j];
    expert_off[el + 1] = expert_off[el] + n;
  }
  const int64_t Re = expert_off[El];
  runs.clear();
  {
    std::vector<int64_t> src_start(static_cast<size_t>(P * blk));
    int64_t pos = 0;
    for (int p = 0; p < P; ++p)
      for (int64_t i = 0; i < blk; ++i) {
        src_start[p * blk + i] = pos;
        pos += crecv[p * blk + i];
      }
    int64_t dst = 0;
    for (int64_t el = 0; el < El; ++el)
      for (int64_t j = 0; j < k; ++j)
        for (int p = 0; p < P; ++p) {
          const int64_t n = crecv[p * blk + el * k + j];
          if (n > 0) runs.push_back({src_start[p * blk + el * k + j], dst, n});
          dst += n;
        }
    MOE_ASSERT(dst == Re);
  }

  // 5. Dispatch: gather kept rows in slot order (grouped by expert, so by owner), exchange,
  // reorder into expert order.
  x.assign(xin, xin + T * d);
  std::vector<float> sendbuf(static_cast<size_t>(nk * d));
  {
    const int32_t* d2s = plan.dest_to_src.data();
    float* sb = sendbuf.data();
    const float* xs = x.data();
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < nk; ++s)
      std::copy(xs + (d2s[s] / k) * d, xs + (d2s[s] / k + 1) * d, sb + s * d);
  }
  xchg.resize(static_cast<size_t>(std::max(Re * std::max(d, Do), int64_t{1})));
  comm.alltoallv_rows(xchg.data(), recv_rows, sendbuf.data(), send_rows, d);
  xg.resize(static_cast<size_t>(Re * d));
  copy_runs_to_expert(xg.data(), xchg.data(), runs, d);

  // 6. The local experts, on exactly the rows (and order) MoELayer would give them.
  const int64_t F = cfg.hidden();
  const bool gated = cfg.expert != ExpertKind::linear_relu;
  a1.resize(static_cast<size_t>(gated ? Re * F : 0));
  hid.resize(a1.size());
  a3.resize(static_cast<size_t>(cfg.expert == ExpertKind::swiglu ? Re * F : 0));
  out.resize(static_cast<size_t>(Re * Do));
  ::moe::detail::ExpertActs acts{a1.data(), a3.data(), hid.data(), out.data()};
  ::moe::detail::experts_forward(acts, xg.data(), expert_weights(), expert_off.data(), shape, gg,
                                 &prec);

  // 7. Combine: outputs go back by the reverse exchange, then the k-way sum per token in
  // rank order, as MoELayer::forward does it.
  copy_runs_to_xchg(xchg.data(), out.data(), runs, Do);
  ret.resize(static_cast<size_t>(std::max(nk * Do, int64_t{1})));
  comm.alltoallv_rows(ret.data(), send_rows, xchg.data(), recv_rows, Do);
  ::moe::detail::combine_rows(y, ret.data(), plan.src_to_dest.data(), routing.weights.data(), T,
                              k, Do, cfg.residual ? x.data() : nullptr);

  // 8. Statistics and losses of the global batch. Loads are exact integer sums; Σ probs and
  // the z-loss sum are per-rank double partials added in rank order.
  std::vector<double> part(static_cast<size_t>(E + 2), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) part[e] += static_cast<double>(routing.probs[t * E + e]);
  if (cfg.z_alpha > 0.0f && T > 0)
    part[E] = ::moe::detail::router_z_loss_t<float>(nullptr, routing.logits.data(), T, E, 1.0) *
              static_cast<double>(T);  // Σ_t lse², this rank's tokens
  part[E + 1] = static_cast<double>(plan.dropped_tokens);
  comm.sum_in_rank_order(part.data(), E + 2);
  psum.assign(part.begin(), part.begin() + E);

  MoEStats& st = stats;
  st.tokens = Tg;
  st.capacity = C;
  st.load_before.assign(static_cast<size_t>(E), 0);
  st.load_after.assign(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < k; ++j) st.load_before[e] += counts_j_e[j * E + e];
    st.load_after[e] = C < 0 ? st.load_before[e] : std::min(st.load_before[e], C);
  }
  int64_t kept = 0, evaluated = 0;
  for (int64_t e = 0; e < E; ++e) {
    kept += st.load_after[e];
    evaluated += st.load_after[e] > 0 ? 1 : 0;
  }
  st.dropped_assignments = Tg * k - kept;
  st.dropped_tokens = static_cast<int64_t>(part[E + 1]);
  st.experts_evaluated = evaluated;
  st.aux_loss = 0.0;
  if (cfg.aux_alpha > 0.0f && Tg > 0) {
    // losses.hpp's formula on the global sums.
    const double fscale =
        1.0 / (static_cast<double>(Tg) * (cfg.normalize_by_k ? double(k) : 1.0));
    double L = 0.0;
    for (int64_t e = 0; e < E; ++e)
      L += (static_cast<double>(st.load_before[e]) * fscale) * (psum[e] / static_cast<double>(Tg));
    st.aux_loss = L * (cfg.aux_alpha * static_cast<double>(E));
  }
  st.z_loss = cfg.z_alpha > 0.0f && Tg > 0
                  ? cfg.z_alpha * part[E] / static_cast<double>(Tg)
                  : 0.0;
  have_forward = true;
}

void ExpertParallelMoE::Impl::backward(float* dx, const float* dy) {
  const int64_t d = cfg.d_model, E = cfg.n_experts, k = cfg.k, Do = cfg.out_dim();
  comm.guarded([&] {
    MOE_REQUIRE(!evaluation_only(cfg.precision), "precision: '", to_string(cfg.precision),
                "' is for evaluation only; backward needs fp32 or bf16");
    MOE_REQUIRE(have_forward, "backward: called before forward (no saved state)");
    MOE_REQUIRE(T == 0 || (dx && dy), "backward: dx and dy must not be null");
  });
  const int64_t nk = plan.n_kept, Re = expert_off[El];
  const int32_t* s2d = plan.src_to_dest.data();
  const int32_t* d2s = plan.dest_to_src.data();
  const float* w = routing.weights.data();

  // Combine backward (local): dG = dy·out, dout = G·dy, as MoELayer::backward.
  dG.assign(static_cast<size_t>(T * k), 0.0f);
  dout.resize(static_cast<size_t>(std::max(nk, Re) * Do));
  ::moe::detail::combine_backward_weights(dG.data(), dy, ret.data(), s2d, T, k, Do);
  ::moe::detail::combine_backward_rows(dout.data(), dy, d2s, w, nk, k, Do);

  // Mirror of dispatch: dout rows travel to the experts' owners like x did…
  comm.alltoallv_rows(xchg.data(), recv_rows, dout.data(), send_rows, Do);
  std::vector<float> dout_e(static_cast<size_t>(Re * Do));
  copy_runs_to_expert(dout_e.data(), xchg.data(), runs, Do);
  const int64_t F = cfg.hidden();
  dh.resize(static_cast<size_t>(cfg.expert == ExpertKind::linear_relu ? 0 : Re * F));
  da3.resize(static_cast<size_t>(cfg.expert == ExpertKind::swiglu ? Re * F : 0));
  dxg.resize(static_cast<size_t>(Re * d));
  ::moe::detail::ExpertActs acts{a1.data(), a3.data(), hid.data(), out.data()};
  ::moe::detail::ExpertScratch scr{dh.data(), da3.data()};
  ::moe::detail::ExpertGrads eg{g("W1"), g("b1"), g("W2"), g("b2"), g("W3")};
  ::moe::detail::experts_backward(dxg.data(), eg, dout_e.data(), scr, acts, xg.data(),
                                  expert_weights(), expert_off.data(), shape, gg, &prec);
  prec.invalidate();  // an optimizer step follows
  // …and dx rows come back like the outputs did.
  copy_runs_to_xchg(xchg.data(), dxg.data(), runs, d);
  std::vector<float> dxret(static_cast<size_t>(std::max(nk * d, int64_t{1})));
  comm.alltoallv_rows(dxret.data(), send_rows, xchg.data(), recv_rows, d);

  // Router: the loss gradients use the global batch (T_g, global loads), with the formulas
  // of losses.hpp; its weight gradients are this rank's partial sums, summed in rank order.
  const float* dprobs_p = nullptr;
  const float* dlogits_p = nullptr;
  if (cfg.aux_alpha > 0.0f && T > 0) {
    const double fscale =
        1.0 / (static_cast<double>(Tg) * (cfg.normalize_by_k ? double(k) : 1.0));
    const double c = cfg.aux_alpha * static_cast<double>(E) / static_cast<double>(Tg);
    dprobs.resize(static_cast<size_t>(T * E));
    for (int64_t e = 0; e < E; ++e) {
      const float v = static_cast<float>(c * (static_cast<double>(stats.load_before[e]) * fscale));
      for (int64_t t = 0; t < T; ++t) dprobs[t * E + e] = v;
    }
    dprobs_p = dprobs.data();
  }
  if (cfg.z_alpha > 0.0f && T > 0) {
    // router_z_loss_t's gradient is (2·c_z/T)·lse·softmax: with c_z scaled by T/T_g the
    // normalisation is the global batch's.
    dlogits.resize(static_cast<size_t>(T * E));
    ::moe::detail::router_z_loss_t<float>(
        dlogits.data(), routing.logits.data(), T, E,
        static_cast<double>(cfg.z_alpha) * static_cast<double>(T) / static_cast<double>(Tg));
    dlogits_p = dlogits.data();
  }
  // Partial router gradients of this rank, packed [W_g | b_g | W_noise].
  const int64_t nW = d * E, nb = cfg.router_bias ? E : 0,
                nN = cfg.noise == Noise::learned ? d * E : 0;
  rgrad.assign(static_cast<size_t>(nW + nb + nN), 0.0f);
  RouterGrads rg{rgrad.data(), nb ? rgrad.data() + nW : nullptr,
                 nN ? rgrad.data() + nW + nb : nullptr};
  if (T > 0)
    router_backward(dx, rg, dG.data(), dprobs_p, dlogits_p, routing, x.data(), router_params(),
                    rcfg);
  comm.sum_in_rank_order(rgrad.data(), static_cast<int64_t>(rgrad.size()));
  {
    float* gW = g("W_g");
    for (int64_t i = 0; i < nW; ++i) gW[i] += rgrad[i];
    if (nb) {
      float* gb = g("b_g");
      for (int64_t i = 0; i < nb; ++i) gb[i] += rgrad[nW + i];
    }
    if (nN) {
      float* gN = g("W_noise");
      for (int64_t i = 0; i < nN; ++i) gN[i] += rgrad[nW + nb + i];
    }
  }

  // Scatter the experts' dx per token in rank order, plus the residual path.
  ::moe::detail::gather_backward_rows(dx, dxret.data(), s2d, T, k, d, false,
                                      cfg.residual ? dy : nullptr);
}

ExpertParallelMoE::ExpertParallelMoE(const MoEConfig& cfg, MPI_Comm comm)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  MPI_Comm_dup(comm, &m.comm_dup);
  m.comm = detail::Comm(m.comm_dup);
  const int P = m.comm.size();

  // Every rank must hold the same config: a mismatch would pair rows of different shapes.
  std::unique_ptr<MoELayer> full;
  std::vector<int64_t> fp;
  m.comm.guarded([&] {
    cfg.validate();
    // Expert parallelism implements the reference router (SPEC §1–§3); the router family of
    // docs/routing.md runs in the single-process layer only, and is refused here by name.
    const MoEConfig d;
    MOE_REQUIRE(cfg.router_kind == d.router_kind && cfg.renormalize == d.renormalize &&
                    cfg.scaling_factor == d.scaling_factor &&
                    cfg.aux_loss_kind == d.aux_loss_kind && !cfg.uses_selection_bias() &&
                    cfg.expert != ExpertKind::clamped_swiglu &&
                    cfg.n_groups == 1 && cfg.n_shared_experts == 0 &&
                    cfg.second_expert_policy == d.second_expert_policy && cfg.jitter == 0.0f &&
                    cfg.tie_break != TieBreak::torch && !cfg.round_router_logits &&
                    !cfg.round_gate_weights && !cfg.round_each_op &&
                    (cfg.drop_policy == DropPolicy::position ||
                     cfg.drop_policy == DropPolicy::probs),
                "expert parallel: supports the reference router only (router topk_softmax, "
                "aux_loss switch, drop_policy position|probs, no groups, shared experts, bias "
                "balancing or selection bias, random second expert, jitter, clamped_swiglu "
                "experts, tie_break torch or the round_* switches)");
    fp = config_fingerprint(cfg);
  });
  std::vector<int64_t> all(fp.size() * static_cast<size_t>(P));
  m.comm.allgather(all.data(), fp.data(), static_cast<int64_t>(fp.size()));
  m.comm.guarded([&] {
    for (int p = 0; p < P; ++p)
      for (size_t i = 0; i < fp.size(); ++i)
        MOE_REQUIRE(all[p * fp.size() + i] == all[i], "config: ", kFingerprintNames[i],
                    " differs between rank 0 and rank ", p);
    // The parameters MoELayer(cfg) starts from, sliced. (The whole model exists on every
    // rank for a moment; see docs/scaling.md.)
    full = std::make_unique<MoELayer>(cfg);
  });

  m.cfg = cfg;
  m.rcfg = cfg.router();
  m.shard = ExpertShard{cfg.n_experts, P};
  m.e0 = m.shard.begin(m.comm.rank());
  m.El = m.shard.count(m.comm.rank());
  m.Emax = (cfg.n_experts + P - 1) / P;
  m.shape = ::moe::detail::ExpertShape::of(cfg);
  m.prec.configure(cfg);
  m.shape.E = m.El;
  for (const auto& n : full->parameter_names()) {
    m.index[n] = m.names.size();
    m.names.push_back(n);
    const auto s = m.local_shape(full->param(n).shape, n);
    m.params.emplace_back(s);
    m.grads.emplace_back(s);
  }
  load_from(*full);
}

ExpertParallelMoE::Impl::~Impl() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_dup != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_dup);
}

ExpertParallelMoE::~ExpertParallelMoE() = default;
ExpertParallelMoE::ExpertParallelMoE(ExpertParallelMoE&&) noexcept = default;
ExpertParallelMoE& ExpertParallelMoE::operator=(ExpertParallelMoE&&) noexcept = default;

const MoEConfig& ExpertParallelMoE::config() const { return impl_->cfg; }
int ExpertParallelMoE::rank() const { return impl_->comm.rank(); }
int ExpertParallelMoE::size() const { return impl_->comm.size(); }
const ExpertShard& ExpertParallelMoE::shard() const { return impl_->shard; }
int64_t ExpertParallelMoE::expert_begin() const { return impl_->e0; }
int64_t ExpertParallelMoE::expert_end() const { return impl_->e0 + impl_->El; }
std::vector<std::string> ExpertParallelMoE::parameter_names() const { return impl_->names; }
Tensor& ExpertParallelMoE::param(const std::string& n) {
  impl_->prec.invalidate();  // the caller may write through it
  return impl_->params[impl_->find(n)];
}
const Tensor& ExpertParallelMoE::param(const std::string& n) const {
  return impl_->params[impl_->find(n)];
}
Tensor& ExpertParallelMoE::grad(const std::string& n) { return impl_->grads[impl_->find(n)]; }
void ExpertParallelMoE::zero_grad() {
  for (auto& g : impl_->grads) std::fill(g.data.begin(), g.data.end(), 0.0f);
}
const MoEStats& ExpertParallelMoE::stats() const { return impl_->stats; }
double ExpertParallelMoE::aux_loss() const { return impl_->stats.aux_loss; }
double ExpertParallelMoE::z_loss() const { return impl_->stats.z_loss; }
const RouterState& ExpertParallelMoE::routing() const { return impl_->routing; }
int64_t ExpertParallelMoE::global_tokens() const { return impl_->Tg; }
int64_t ExpertParallelMoE::token_offset() const { return impl_->off; }
CommStats& ExpertParallelMoE::comm_stats() { return impl_->comm.stats(); }

void ExpertParallelMoE::load_from(const MoELayer& full) {
  Impl& m = *impl_;
  for (size_t i = 0; i < m.names.size(); ++i) {
    const Tensor& src = full.param(m.names[i]);
    Tensor& dst = m.params[i];
    const int64_t per = src.shape.empty() || src.shape[0] == 0 ? 0 : src.numel() / src.shape[0];
    const int64_t first = is_router_param(m.names[i]) ? 0 : m.e0 * per;
    MOE_REQUIRE(first + dst.numel() <= src.numel(), m.names[i], ": the full layer's shape ",
                shape_str(src.shape), " does not hold this rank's slice");
    std::copy(src.data.begin() + first, src.data.begin() + first + dst.numel(), dst.data.begin());
  }
}

void ExpertParallelMoE::store_into(MoELayer& full) const {
  const Impl& m = *impl_;
  for (size_t i = 0; i < m.names.size(); ++i) {
    Tensor& dst = full.param(m.names[i]);
    const Tensor& src = m.params[i];
    const int64_t per = dst.shape.empty() || dst.shape[0] == 0 ? 0 : dst.numel() / dst.shape[0];
    const int64_t first = is_router_param(m.names[i]) ? 0 : m.e0 * per;
    MOE_REQUIRE(first + src.numel() <= dst.numel(), m.names[i], ": the full layer's shape ",
                shape_str(dst.shape), " cannot take this rank's slice");
    std::copy(src.data.begin(), src.data.end(), dst.data.begin() + first);
  }
}

void ExpertParallelMoE::forward(float* y, const float* x, int64_t T, const ForwardOptions& opt) {
  impl_->forward(y, x, T, opt);
}
void ExpertParallelMoE::backward(float* dx, const float* dy) { impl_->backward(dx, dy); }

double ExpertParallelMoE::global_grad_norm_sq() {
  Impl& m = *impl_;
  double router = 0.0, experts = 0.0;
  for (size_t i = 0; i < m.names.size(); ++i) {
    double s = 0.0;
    for (float v : m.grads[i].data) s += static_cast<double>(v) * v;
    (is_router_param(m.names[i]) ? router : experts) += s;
  }
  // Experts are disjoint across ranks; the router is the same on all ranks, counted once.
  m.comm.sum_in_rank_order(&experts, 1);
  return router + experts;
}

}  // namespace moe::dist
