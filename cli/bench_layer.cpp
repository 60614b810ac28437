// `moe bench`: the layer's forward and forward+backward beside its roofs, memory.
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
#include "layer/layer_access.hpp"
#include "moe/error.hpp"
#include "moe/pretrained.hpp"
#include "moe/router.hpp"

namespace moe::cli::bench {

namespace {

// Inputs that look like activations: values in [-1, 1) from a fixed hash.
std::vector<float> pattern(int64_t n, uint32_t salt) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ (salt * 0x9E3779B9u);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    v[static_cast<size_t>(i)] = static_cast<float>(h & 0xFFFFu) / 32768.0f - 1.0f;
  }
  return v;
}

}  // namespace

std::vector<float> bench_input(int64_t T, int64_t d) { return pattern(T * d, 1); }

// MemAvailable, or MOE_BENCH_MEM_AVAILABLE (bytes) when set: the tests use it to reach the
// skip and forward-only paths without a machine that is short of memory.
int64_t mem_available_bytes() {
  if (const char* env = std::getenv("MOE_BENCH_MEM_AVAILABLE")) return std::atoll(env);
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return int64_t{1} << 40;  // unknown: do not refuse
}

// What a run of the case holds at once: parameters, gradients when backward runs (the layer
// allocates them on first use), and the activations of T·k rows (a generous bound). bf16
// adds the weights' copies: half the parameter bytes, twice with backward's transposes; int8
// a quarter (evaluation only).
int64_t bytes_needed(const BenchCase& c, bool with_grads) {
  const MoEConfig& m = c.cfg;
  const int64_t R = c.T * m.k;
  const int64_t acts = 4 * (R * (2 * m.d_model + 6 * m.hidden() + 3 * m.out_dim()) +
                            c.T * (4 * m.d_model + 8 * m.n_experts));
  const bool bf16 = m.precision == Precision::bf16;
  return perf::layer_param_bytes(m) * (with_grads ? 2 : 1) + acts +
         (bf16 ? perf::layer_param_bytes(m) / 2 * (with_grads ? 2 : 1) : 0) +
         (m.precision == Precision::int8 || m.precision == Precision::fp8
              ? perf::layer_param_bytes(m) / 4
              : 0) +
         (m.precision == Precision::int4 || m.precision == Precision::mxfp4
              ? perf::layer_param_bytes(m) / 7
              : 0);
}


// Another layer holding the same bytes as `src`, a low-bit layer without masters: its
// parameters and its expert matrices' bytes copied.
MoELayer low_bit_copy(const MoELayer& src) {
  LayerOptions held;
  held.masters = false;
  held.initialise = false;
  MoELayer c(src.config(), held);
  for (const std::string& name : src.parameter_names()) c.param(name).data = src.param(name).data;
  const MoEConfig& m = src.config();
  for (const char* name : {"W1", "W2", "W3", "Ws1", "Ws2", "Ws3"}) {
    const bool shared = name[1] == 's';
    const bool glu = m.expert == ExpertKind::swiglu || m.expert == ExpertKind::clamped_swiglu;
    if ((shared && m.n_shared_experts == 0) || (name[std::string(name).size() - 1] == '2' &&
                                                m.expert == ExpertKind::linear_relu) ||
        (name[std::string(name).size() - 1] == '3' && !glu))
      continue;
    const int64_t E = shared ? m.n_shared_experts : m.n_experts;
    for (int64_t e = 0; e < E; ++e)
      detail::LayerAccess::set_expert_matrix_stored(
          c, name, e, detail::LayerAccess::expert_matrix_stored(src, name, e));
  }
  return c;
}

void run_layer(Result& r, const BenchOptions& o, std::unique_ptr<perf::ReadRoof>& mem_roof,
               const perf::MachineInfo& machine) {
  const BenchCase& c = r.c;
  const MoEConfig& m = c.cfg;
  const int64_t T = c.T, d = m.d_model, Do = m.out_dim();
  const auto x = bench_input(T, d), dy = pattern(T * Do, 2);
  std::vector<float> y(static_cast<size_t>(T * Do)), dx(static_cast<size_t>(T * d));
  r.gflop_fwd = perf::layer_flops_fwd(c) / 1e9;

  // Both roofs keep their buffers, allocated before the heap window opens, and are timed
  // again before every layer sample below: the sgemm roof per configuration, the read
  // bandwidth's 1 GiB buffer once for all decode configurations.
  // The compute roof in the layer's precision: oneDNN sgemm, or oneDNN's bf16 matmul. int8
  // has none of its own here: its rows stand beside the bf16 roof, so that a share above 1
  // is how much faster than bf16's GEMM the int8 layer runs (docs/design.md, "Precision int8").
  const bool bf16 = m.precision != Precision::fp32;
  std::unique_ptr<perf::SgemmRoof> sgemm;
  std::unique_ptr<perf::Bf16Roof> bgemm;
  std::function<double()> roof_run;
  double roof_flops = 0.0;
  if (c.memory_roof || c.weights_roof) {
    if (!mem_roof) {
      mem_roof = std::make_unique<perf::ReadRoof>(o.quick ? (int64_t{128} << 20)
                                                          : (int64_t{1} << 30));
      mem_roof->run_s();  // warm-up
      // The roof is the fastest of several read patterns (threads, streams per thread,
      // non-temporal loads, prefetch), chosen once here; every sample below uses it.
      std::cerr << "bench: read roof: timing " << perf::read_patterns(omp_get_max_threads()).size()
                << " read patterns...\n";
      mem_roof->calibrate(o.quick ? 1 : 2);
    }
    r.read_pattern = mem_roof->pattern().name();
  }
  if (!c.memory_roof) {
    if (bf16) {
      bgemm = std::make_unique<perf::Bf16Roof>(T * m.k, m.hidden(), d);
      roof_run = [&] { return bgemm->run_s(); };
      roof_flops = bgemm->flops();
      r.roof_impl = bgemm->impl();
    } else {
      sgemm = std::make_unique<perf::SgemmRoof>(T * m.k, m.hidden(), d);
      roof_run = [&] { return sgemm->run_s(); };
      roof_flops = sgemm->flops();
      r.roof_impl = "dnnl_sgemm";
    }
    roof_run();  // warm-up: oneDNN's first call sets itself up
  }
  const bool roof = static_cast<bool>(roof_run);
  r.roof_kind = c.memory_roof ? "memory" : c.weights_roof ? (bf16 ? "bf16+memory" : "sgemm+memory")
                                         : (bf16 ? "bf16" : "sgemm");
  const int rep = std::max(o.repeat, 1);
  std::vector<double> fwd_samples, fwdbwd_samples;
  for (auto* v : {&fwd_samples, &fwdbwd_samples, &r.roof_samples, &r.read_bw_samples,
                  &r.ratio_fwd_samples, &r.ratio_fwdbwd_samples})
    v->reserve(static_cast<size_t>(rep));

  HeapWindow heap;
  heap.start();
  // A checkpoint's block is loaded as a user loads it (evaluation-only, its experts held in
  // the row's precision only); its parameter bytes are what the load left on the heap.
  const bool from_ckpt = !c.model_dir.empty();
  MoELayer layer = from_ckpt ? load_pretrained(c.model_dir, c.model_layer, m.precision)
                             : MoELayer(m);
  // A low-bit layer is evaluation-only and held as a user serves it: its bytes, no masters
  // (its cold copies below are copies of those bytes, not quantized again each).
  // The heap window opens again on the layer as held (the masters' quantization is not the
  // forward's workspace); `held` keeps what the layer holds from before.
  int64_t held = 0;
  if (low_bit(m.precision) && !from_ckpt) {
    layer.drop_masters();
    held = heap.live();
    heap.start();
  }
  if (from_ckpt || held > 0)  // what the layer holds: its format's bytes too
    r.param_bytes = held + heap.live();
  else
    for (const auto& name : layer.parameter_names())
      r.param_bytes += layer.param(name).numel() * static_cast<int64_t>(sizeof(float));
  // Gradients exist only where backward runs (the layer allocates them on first use).
  if (c.backward)
    for (const auto& name : layer.parameter_names())
      r.grad_bytes += layer.grad(name).numel() * static_cast<int64_t>(sizeof(float));
  const int64_t constructed = heap.live();  // since the window opened (held before it)

  ForwardOptions fo;
  fo.training = c.training;
  auto fwd = [&](int64_t n) { layer.forward(y.data(), x.data(), n, fo); };
  auto fwdbwd = [&](int64_t n) {
    layer.forward(y.data(), x.data(), n, fo);
    layer.backward(dx.data(), dy.data());
  };
  auto step = [&](int64_t n) { c.backward ? fwdbwd(n) : fwd(n); };

  // Buffers the layer keeps after a call at T/2, then at T: a buffer sized T·E·C (quadratic
  // in T) shows as a ratio near 4, buffers linear in T as a ratio near 2. Retained bytes, not
  // the peak: the peak of the second call also holds the T/2 buffers while they are resized.
  int64_t kept_half = 0;
  if (T >= 2) {
    step(T / 2);
    kept_half = heap.live() - constructed;
  }
  step(T);  // also the warm-up
  const int64_t kept_full = heap.live() - constructed;
  if (T >= 2 && kept_half > 0) r.ws_growth = static_cast<double>(kept_full) / kept_half;

  // The routing of that forward: what the kt-kernel peer is given, so that it runs the same
  // experts on the same rows.
  r.route_indices = layer.routing().indices;
  r.route_weights = layer.routing().weights;
  const MoEStats& st = layer.stats();
  r.kept_rows = T * m.k - st.dropped_assignments;
  r.dropped = st.dropped_assignments;
  r.experts_evaluated = st.experts_evaluated;
  // Bytes a forward must read: the selected experts' weights (in the layer's precision) and
  // the router's.
  if (c.memory_roof || c.weights_roof)
    r.selected_bytes = r.experts_evaluated * perf::expert_read_bytes(m) +
                       d * m.n_experts * static_cast<int64_t>(sizeof(float));

  // Cold decode: a decode step of a real model reads each layer's weights once, from memory.
  // Calling the same layer again and again would find part of them in the last-level cache
  // (the Xeon reports 480 MiB of L3), so decode rows rotate over independent copies
  // of the block (the same weights, held again), enough that the calls on the others read
  // cold_margin × the LLC between two calls on one copy; a sample is one sweep over the copies,
  // divided by their count. The copies are what the memory allows; fewer than wanted is said.
  // The heap figures (peak, largest allocation) stay those of one layer.
  const int64_t peak_one = held + heap.peak(), largest_one = heap.largest();
  std::vector<MoELayer> copies;
  if (c.memory_roof) {
    r.cold_layers_wanted =
        perf::cold_layer_count(r.selected_bytes, machine.llc_bytes, o.cold_margin);
    const int64_t per_copy = std::max<int64_t>(held + constructed, 1);
    const double budget = static_cast<double>(mem_available_bytes()) * o.mem_fraction;
    const int fit = 1 + static_cast<int>(std::min(budget / static_cast<double>(per_copy), 1e6));
    r.cold_layers = std::max(1, std::min(r.cold_layers_wanted, fit));
    if (r.cold_layers < r.cold_layers_wanted)
      r.cold_note = "cold rotation short: " + std::to_string(r.cold_layers) + " of the " +
                    std::to_string(r.cold_layers_wanted) + " layer copies needed fit in memory";
    if (r.cold_layers > 1)
      std::cerr << "bench: " << c.name << " cold decode: " << r.cold_layers
                << " copies of the layer (" << fmt(r.selected_bytes / 1048576.0, 1)
                << " MiB read per call, LLC " << fmt(machine.llc_bytes / 1048576.0, 1)
                << " MiB)...\n";
    for (int i = 1; i < r.cold_layers; ++i) {
      copies.push_back(from_ckpt             ? load_pretrained(c.model_dir, c.model_layer, m.precision)
                       : low_bit(m.precision) ? low_bit_copy(layer)
                                              : MoELayer(m));
      copies.back().forward(y.data(), x.data(), T, fo);  // its warm-up (packing, workspace)
    }
  }
  // One timed sample of the forward: a sweep over the layer and its copies, per layer.
  auto fwd_sample = [&] {
    layer.forward(y.data(), x.data(), T, fo);
    for (MoELayer& l : copies) l.forward(y.data(), x.data(), T, fo);
  };
  const double per_sweep = 1.0 + static_cast<double>(copies.size());

  // Interleaved: per repeat roof, forward, [forward+backward], so that each layer sample has
  // a roof sample taken within a second of it and the VM's drift cancels in their ratio.
  // Allocations are counted inside the layer's calls only (the harness's sample vectors were
  // reserved before the heap window opened).
  int64_t allocs_fwd = 0, allocs_fwdbwd = 0;
  auto timed = [&heap](const std::function<void()>& f, int64_t& allocs) {
    const int64_t a0 = heap.allocs();
    const double t0 = perf::now_s();
    f();
    const double t = perf::now_s() - t0;
    allocs += heap.allocs() - a0;
    return t;
  };
  const bool mem = c.memory_roof || c.weights_roof;
  for (int i = 0; i < rep; ++i) {
    const double roof_gflops = roof ? roof_flops / roof_run() / 1e9 : 0.0;
    const double read_bw = mem ? mem_roof->bytes() / mem_roof->run_s() : 0.0;
    const double tf = timed(fwd_sample, allocs_fwd) / per_sweep;
    fwd_samples.push_back(tf);
    if (roof) r.roof_samples.push_back(roof_gflops);
    if (mem) r.read_bw_samples.push_back(read_bw);
    // The roof's time for this sample (FLOPs at the rate, bytes at the bandwidth measured
    // just before it; the larger of the two when both bound it) over the forward's.
    const double t_flops = roof ? r.gflop_fwd / roof_gflops : 0.0;
    const double t_bytes = mem ? static_cast<double>(r.selected_bytes) / read_bw : 0.0;
    r.ratio_fwd_samples.push_back(std::max(t_flops, t_bytes) / tf);
    if (c.backward) {
      const double tb = timed([&] { fwdbwd(T); }, allocs_fwdbwd);
      fwdbwd_samples.push_back(tb);
      if (roof) r.ratio_fwdbwd_samples.push_back(3.0 * r.gflop_fwd / tb / roof_gflops);
    }
  }
  r.fwd_s = perf::median(fwd_samples);
  r.allocs_fwd = static_cast<double>(allocs_fwd) / rep / per_sweep;
  if (c.backward) {
    r.fwdbwd_s = perf::median(fwdbwd_samples);
    r.allocs_fwdbwd = static_cast<double>(allocs_fwdbwd) / rep;
  }
  if (roof) {
    r.roof_gflops = perf::median(r.roof_samples);
    r.roof_s = r.gflop_fwd / r.roof_gflops;
    r.ratio_fwd = perf::median(r.ratio_fwd_samples);
    if (c.backward) r.ratio_fwdbwd = perf::median(r.ratio_fwdbwd_samples);
  }
  if (c.weights_roof) {
    r.read_bw = perf::median(r.read_bw_samples);
    const double t_bytes = static_cast<double>(r.selected_bytes) / r.read_bw;
    r.memory_bound = t_bytes > r.roof_s;
    r.roof_s = std::max(r.roof_s, t_bytes);
  }
  r.peak_bytes = copies.empty() ? held + heap.peak() : peak_one;
  r.largest_alloc = copies.empty() ? heap.largest() : largest_one;
  r.workspace_bytes = std::max<int64_t>(0, r.peak_bytes - r.param_bytes - r.grad_bytes);

  // The router alone, on the layer's own weights, in the same mode.
  {
    RouterState rs;
    const bool has_b = m.router_bias, has_n = m.noise == Noise::learned;
    RouterParams rp{layer.param("W_g").ptr(), has_b ? layer.param("b_g").ptr() : nullptr,
                    has_n ? layer.param("W_noise").ptr() : nullptr};
    NoiseSource ns;
    ns.seed = m.seed;
    const RouterConfig rc = m.router();
    r.router_s = perf::time_median(
        [&] { router_forward(rs, x.data(), rp, rc, T, c.training, ns); }, 1, rep);
  }

  if (c.memory_roof) {
    r.memory_bound = true;
    r.read_bw = perf::median(r.read_bw_samples);
    r.roof_s = static_cast<double>(r.selected_bytes) / r.read_bw;
    r.roof_gflops = r.gflop_fwd / r.roof_s;
    r.ratio_fwd = perf::median(r.ratio_fwd_samples);
  }
  r.ran = true;
}

}  // namespace moe::cli::bench
