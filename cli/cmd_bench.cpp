// `moe bench`: the MoE layer's performance against the machine.
//
// For each configuration (B1, B2, B3 at T = 1, 4, 16, the E-sweep; the real-model blocks)
// it measures, in the same run: the layer's forward and forward+backward time (median of
// --repeat after a warm-up), the router's forward alone, the roof (oneDNN's GEMM in the
// row's precision on the dense [T·k, d] × [d, d_ff] product, timed before every layer
// sample so that the shares of the roof are medians of pairs measured together; for decode
// the streaming read bandwidth over the selected experts' weight bytes; for the real-model
// blocks the larger of the two),
// memory (parameters, gradients, the layer's workspace, the largest single allocation and
// how the workspace grows from T/2 to T), and the PyTorch peer bench/peers/moe_peer.py run
// as a subprocess (peer_python()). Then it prints the performance goals and whether
// each is met. FLOP counting: src/perf/suite.hpp and docs/benchmarks.md.
//
// The parts, by what they measure: bench.hpp (and bench_heap.cpp for the heap accounting
// that replaces the binary's operator new/delete).

#include <set>
#include <omp.h>

#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench.hpp"
#include "commands.hpp"
#include "io/pretrained_folder.hpp"
#include "moe/error.hpp"
#include "moe/layer.hpp"

#include <sys/stat.h>

namespace moe::cli {

namespace {

using namespace bench;

int run_bench(const BenchOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  const int threads = omp_get_max_threads();
  if (o.repeat < 1) throw Error("--repeat: must be >= 1, got " + std::to_string(o.repeat));
  const bool auto_asked = ("," + o.precision + ",").find(",auto,") != std::string::npos;
  if (auto_asked && o.model.empty())
    throw Error("--precision: 'auto' (the folder's stored format) is for --model only");
  if (!generate_model(o.config).empty()) return run_generate(o, threads);
  if (("," + o.precision + ",").find(",published,") != std::string::npos)
    throw Error("--precision: 'published' is for --config generate-qwen3 / generate-gpt-oss only");
  // --model: "auto" (its default) is the precision that keeps the block's experts as stored.
  detail::StoredBlockFormat stored;
  const bool model_auto = !o.model.empty() && (auto_asked || o.precision.empty());
  if (model_auto) {
    if (o.layer < 0) throw Error("--layer: needed with --model (a decoder layer index)");
    stored = detail::stored_block_format(o.model, o.layer);
    std::cerr << "bench: --model layer " << o.layer << ": precision auto = "
              << to_string(stored.precision) << " (stored as " << stored.words << ")\n";
  }
  // --precision: one precision, or several separated by commas (their rows in one run, so
  // that one format stands beside another measured the same way).
  std::vector<Precision> precs;
  std::vector<bool> precs_auto;  // which of them "auto" named
  for (size_t at = 0; at < o.precision.size();) {
    const size_t comma = std::min(o.precision.find(',', at), o.precision.size());
    const std::string name = o.precision.substr(at, comma - at);
    precs.push_back(name == "auto" ? stored.precision : parse_precision(name));
    precs_auto.push_back(name == "auto");
    at = comma + 1;
  }
  if (model_auto && precs.empty()) {
    precs.push_back(stored.precision);
    precs_auto.push_back(true);
  }
  std::optional<Precision> precision;
  if (!precs.empty()) precision = precs.front();
  // Every case once per precision asked for (each case keeps its own when none is).
  const auto per_precision = [&](const std::vector<BenchCase>& in) {
    if (precs.empty()) return in;
    std::vector<BenchCase> out;
    for (size_t i = 0; i < precs.size(); ++i)
      for (BenchCase c : in) {
        c.cfg.precision = precs[i];
        if (precs_auto[i]) {  // the layer's own config: an int4 checkpoint's group, zero points
          c.cfg = stored.config;
          c.stored_format = stored.words;
        }
        out.push_back(c);
      }
    return out;
  };
  std::vector<BenchCase> cases;
  if (o.config.empty()) {
    if (precs.empty()) cases = perf::default_cases(o.quick, Precision::fp32);
    for (Precision p : precs)
      for (const BenchCase& c : perf::default_cases(o.quick, p)) cases.push_back(c);
  } else {
    cases = perf::bench_cases(o.quick);
  }
  const bool dist_only = o.config == "dist";
  if (o.config == "module") {  // moe.torch.MoE over the bare library, B1 in fp32 and bf16
    std::string note;
    const auto rows = run_module_overhead(o, threads, note);
    if (rows.empty()) throw Error(note);
    if (o.json_out) {
      for (const json& r : rows) std::cout << r.dump() << std::endl;
      return 0;
    }
    std::cout << "moe.torch.MoE against the bare library (moe.MoE), B1, " << threads
              << " thread(s), medians of " << o.repeat << " interleaved repeats\n"
              << "| precision | bare fwd ms | module fwd ms | overhead | bare f+b ms | "
                 "module f+b ms | overhead |\n|---|---|---|---|---|---|---|\n";
    bool met = true;
    for (const json& r : rows) {
      const double of = r["overhead_fwd"].get<double>(), ob = r["overhead_fwdbwd"].get<double>();
      met = met && of <= 0.03 && ob <= 0.05;
      std::cout << "| " << r["precision"].get<std::string>() << " | "
                << fmt(1e3 * r["bare_fwd_s"].get<double>(), 1) << " | "
                << fmt(1e3 * r["mod_fwd_s"].get<double>(), 1) << " | " << fmt(100.0 * of, 1)
                << "% | " << fmt(1e3 * r["bare_fb_s"].get<double>(), 1) << " | "
                << fmt(1e3 * r["mod_fb_s"].get<double>(), 1) << " | " << fmt(100.0 * ob, 1)
                << "% |\n";
    }
    std::cout << "\nGoal: module overhead <= 3% forward, <= 5% forward+backward: "
              << (met ? "met" : "MISSED") << '\n';
    return 0;
  }
  if (dist_only) cases.clear();
  // Checkpoint blocks: --model PATH --layer N, or the real-model checkpoints written here.
  const bool ckpt = !o.model.empty() || o.config == "real-models";
  if (!o.model.empty()) {
    if (o.layer < 0) throw Error("--layer: needed with --model (a decoder layer index)");
    if (!o.config.empty()) throw Error("--config: not with --model");
    cases = model_cases(o.model, o.layer, o.tokens, precision.value_or(Precision::bf16), "model");
    cases = per_precision(cases);
  } else if (o.config == "real-models") {
    const std::string parent = o.workdir.empty() ? "/tmp/moe-bench-checkpoints" : o.workdir;
    ::mkdir(parent.c_str(), 0755);
    cases.clear();
    for (const char* name : {"Qwen3-30B-A3B", "Mixtral-8x7B"}) {
      std::string note;
      std::cerr << "bench: writing (or reusing) a random " << name << " checkpoint in " << parent
                << "...\n";
      const std::string dir = make_checkpoint(name, parent, o.quick, note);
      if (dir.empty()) throw Error(std::string("--config real-models: ") + name + ": " + note);
      for (BenchCase& c : per_precision(model_cases(dir, 0, o.quick ? 32 : o.tokens,
                                                    precision.value_or(Precision::bf16),
                                                    std::string("ckpt-") + name)))
        cases.push_back(c);
    }
  }
  if (!o.config.empty() && !dist_only && !ckpt) {
    std::vector<BenchCase> pick;
    for (const auto& c : cases)
      if (c.name == o.config || c.group == o.config) pick.push_back(c);
    if (pick.empty()) {
      std::string names;
      for (const auto& c : cases) names += (names.empty() ? "" : ", ") + c.name;
      throw Error("--config: unknown configuration '" + o.config + "' (expected one of " + names +
                  ", B3, E-sweep, real, real-models, dist, module, generate-qwen3 or "
                  "generate-gpt-oss)");
    }
    cases = per_precision(pick);
  }
  // --quick is a smoke test of seconds: no peer (a Python process with torch per row).
  const bool peer_ok = !o.no_peer && !o.quick && python_has_torch();
  const std::string peer_na = o.no_peer ? "n/a (--no-peer)"
                              : o.quick ? "n/a (--quick)"
                                        : "n/a (no torch)";

  std::vector<Result> results;
  std::unique_ptr<perf::ReadRoof> mem_roof;
  const perf::MachineInfo machine = perf::read_machine_info();
  for (const BenchCase& c : cases) {
    Result r;
    r.c = c;
    const auto avail = static_cast<double>(mem_available_bytes()) * o.mem_fraction;
    const auto need_fwd = static_cast<double>(bytes_needed(c, false));
    const auto need = static_cast<double>(bytes_needed(c, c.backward));
    const auto gib = [](double b) { return fmt(b / 1073741824.0, 1) + " GiB"; };
    if (need > avail && need_fwd <= avail) {
      // The forward alone fits (the layer allocates gradients on the first backward).
      r.c.backward = false;
      r.note = "forward only: with gradients it needs ~" + gib(need) + ", " + gib(avail) +
               " usable of the memory available";
      std::cerr << "bench: " << c.name << " " << r.note << '\n';
    } else if (need > avail) {
      r.note = "needs ~" + gib(need) + " (parameters, " + (c.backward ? "gradients, " : "") +
               "activations), " + gib(avail) + " usable of the memory available";
      std::cerr << "bench: " << c.name << " skipped: " << r.note << '\n';
      results.push_back(r);
      continue;
    }
    std::cerr << "bench: " << c.name << " (T=" << c.T << ", E=" << c.cfg.n_experts
              << ", d=" << c.cfg.d_model << ", d_ff=" << c.cfg.hidden() << ")...\n";
    run_layer(r, o, mem_roof, machine);
    if (!r.note.empty()) {
      r.peer_note = "n/a (" + r.note + ")";
    } else if (!peer_ok) {
      r.peer_note = peer_na;
    } else if (evaluation_only(c.cfg.precision)) {
      r.peer_note = std::string("n/a (no ") + to_string(c.cfg.precision) + " peer)";
    } else if (static_cast<double>(bytes_needed(c, c.backward)) >
               static_cast<double>(mem_available_bytes()) * o.mem_fraction) {
      r.peer_note = "n/a (not enough memory for the peer)";
    } else {
      std::cerr << "bench: " << c.name << (ckpt ? " transformers peer" : " PyTorch peer")
                << "...\n";
      ckpt ? run_hf_peer(r, o, threads) : run_peer(r, o, threads);
    }
    // The kt-kernel peer: rows whose experts it runs (swiglu; bf16, int8, int4, mxfp4, fp8;
    // evaluation).
    if (!r.ran) {
      r.kt_note = "skipped: the row did not run";
    } else if (o.no_peer) {
      r.kt_note = "skipped: --no-peer";
    } else if (const std::string why = kt_not_applicable(c); !why.empty()) {
      r.kt_note = "skipped: " + why;
    } else {
      std::cerr << "bench: " << c.name << " kt-kernel peer...\n";
      run_kt_peer(r, o, threads);
    }
    if (ckpt && !c.memory_roof && r.ran) {
      std::cerr << "bench: " << c.name << " load time against reading its bytes...\n";
      r.load = measure_load(c.model_dir, c.model_layer, c.cfg.precision, std::min(o.repeat, 3));
    }
    if (o.json_out) {
      json j = to_json(r, threads, o.repeat);
      j["machine"] = machine_json(machine, mem_roof.get());
      std::cout << j.dump() << std::endl;
    }
    results.push_back(r);
  }
  std::vector<DistResult> dist;
  if ((o.config.empty() || dist_only) && !o.no_dist && !precision && !ckpt)
    for (int P : {2, 4}) {
      std::cerr << "bench: expert parallelism on loopback, P=" << P << "...\n";
      dist.push_back(run_dist(P, o.quick));
    }
  // The goals are set for the full sizes: --quick sizes are listed, not judged.
  auto goals = evaluate_goals(results);
  if (o.quick)
    for (Goal& g : goals) {
      g.met = std::nullopt;
      g.detail = "not judged at --quick sizes (the goals are for the full sizes)";
    }
  const auto report_goals = [&](std::ostream& os) { print_goals(goals, os); };
  if (o.json_out) {
    for (const Result& r : results)
      if (!r.ran) {
        json j = to_json(r, threads, o.repeat);
        j["machine"] = machine_json(machine, mem_roof.get());
        std::cout << j.dump() << std::endl;
      }
    for (const DistResult& d : dist) {
      json j = d.res.is_object() ? d.res : json::object();
      j["name"] = "dist-P" + std::to_string(d.P);
      if (!d.note.empty()) j["note"] = d.note;
      std::cout << j.dump() << std::endl;
    }
    report_goals(std::cerr);
  } else {
    std::cout << "moe bench: " << threads << " thread(s), median of " << o.repeat
              << " repeat(s)" << (o.quick ? ", --quick sizes" : "") << ", load average "
              << fmt(load_average(), 2) << " at the end on " << std::thread::hardware_concurrency()
              << " CPU(s)\n";
    print_machine_header(std::cout, machine, mem_roof.get());
    if (model_auto)
      std::cout << "model: " << o.model << ", layer " << o.layer << ", precision auto = "
                << to_string(stored.precision) << " (experts stored as " << stored.words
                << ")\n";
    std::cout << '\n';
    print_table(results, std::cout);
    std::cout << '\n';
    report_goals(std::cout);
    if (!dist.empty()) {
      std::cout << "\nExpert parallelism on loopback (mpirun, 1 thread per rank; "
                   "docs/scaling.md has the model for real interconnects)\n"
                   "| P | tokens/rank | step ms | inside MPI | comm share | rows sent/rank B | "
                   "model B |\n|---|---|---|---|---|---|---|\n";
      for (const DistResult& d : dist) {
        if (!d.note.empty()) {
          std::cout << "| " << d.P << " | " << d.note << " | | | | | |\n";
          continue;
        }
        const json& r = d.res;
        std::cout << "| " << d.P << " | " << r.value("tokens_per_rank", 0) << " | "
                  << fmt(1e3 * r.value("step_seconds", 0.0), 1) << " | "
                  << fmt(1e3 * r.value("mpi_seconds", 0.0), 1) << " ms | "
                  << fmt(100.0 * r.value("comm_share", 0.0), 1) << "% | "
                  << fmt(r.value("row_bytes_sent_per_rank", 0.0), 0) << " | "
                  << fmt(r.value("row_bytes_model", 0.0), 0) << " |\n";
      }
    }
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, int& status) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "bench", "Benchmark the MoE layer (B1, B2, B3, E-sweep, real-model blocks) against the "
               "oneDNN GEMM roof of its precision, the memory roof and the PyTorch peer, and "
               "check the goals.");
  sub->add_option("--threads", o->threads, "OpenMP threads (default: OMP_NUM_THREADS or all)")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--config", o->config,
                  "Run one configuration (B1, B2, B3-T1, B3-T4, B3-T16, E8, E64, E256, E1024, "
                  "Qwen3-30B-A3B, Mixtral-8x7B) or a group (B3, E-sweep, real), or real-models "
                  "(random full-size Qwen3-30B-A3B and Mixtral-8x7B checkpoints loaded by "
                  "load_pretrained, beside transformers), or dist (only "
                  "the expert-parallel rows), or module (moe.torch.MoE's overhead over the "
                  "bare library at B1), or generate-qwen3 / generate-gpt-oss (greedy "
                  "generation with a 2-layer Qwen3-30B-A3B / GPT-OSS-20B-shaped transformers "
                  "model, its MoE blocks as transformers has them and replaced by libmoe's: "
                  "examples/generate.py, or MOE_GENERATE_SCRIPT, given --threads, --repeat, "
                  "--tokens as its prompt, --precision as its precisions (default "
                  "bf16,int8,int4,published), --quick as its tiny sizes, --json)");
  sub->add_option("--precision", o->precision,
                  "fp32 | bf16 | int8 | int4 | mxfp4 | fp8, or several separated by commas "
                  "(bf16,int4: each configuration in each, in one run): run the configurations "
                  "in this precision (default: fp32, bf16 for --config real-models, auto for "
                  "--model). With --model, also auto: the precision that keeps the block's "
                  "experts as the folder stores them (bf16 for BF16 / F16 / F32 files, fp8, "
                  "mxfp4, int4 for GPTQ / AWQ), named in the header. Alone, bf16 "
                  "runs B1, B3-T1 and the real-model blocks against the bf16 roof and a bf16 "
                  "PyTorch peer; int8, int4, mxfp4 and fp8 (evaluation only) run B3-T1, B3-T4, "
                  "B3-T16 beside their memory roofs (the bytes of the format) and the "
                  "real-model blocks beside the bf16 roof; with --config generate-*, also "
                  "published (the model's published expert format)")
      ->check([](const std::string& v) -> std::string {
        const std::set<std::string> known{"fp32", "bf16", "int8", "int4", "mxfp4", "fp8",
                                          "published", "auto"};
        for (size_t at = 0; at <= v.size();) {
          const size_t comma = std::min(v.find(',', at), v.size());
          if (!known.count(v.substr(at, comma - at)))
            return "'" + v.substr(at, comma - at) +
                   "' is not one of fp32, bf16, int8, int4, mxfp4, fp8 (several: bf16,int4; "
                   "published with --config generate-*; auto with --model)";
          at = comma + 1;
        }
        return "";
      });
  sub->add_option("--model", o->model,
                  "A Hugging Face model folder: benchmark the MoE block of --layer (prefill at "
                  "--tokens, decode at T=1, load time) beside its roofs and the family's "
                  "transformers module, in the precision the folder stores it in unless "
                  "--precision names one");
  sub->add_option("--layer", o->layer, "Decoder layer of --model")->check(CLI::NonNegativeNumber);
  sub->add_option("--tokens", o->tokens, "Prefill tokens of --model / real-models (default 512)")
      ->check(CLI::PositiveNumber);
  sub->add_option("--workdir", o->workdir,
                  "Where --config real-models writes its random full-size checkpoints "
                  "(default /tmp/moe-bench-checkpoints; reused when present)");
  sub->add_option("--repeat", o->repeat, "Timed repeats per measurement; the median is kept")
      ->check(CLI::PositiveNumber);
  sub->add_flag("--no-peer", o->no_peer,
                "Do not run the peers (PyTorch, transformers, kt-kernel)");
  sub->add_flag("--no-kt", o->no_kt, "Do not run the kt-kernel (KTransformers) peer");
  sub->add_option("--kt-python", o->kt_python,
                  "Interpreter with kt-kernel installed (default: MOE_KT_PYTHON, else "
                  "$MOE_KT_VENV/bin/python, else .venv-kt/bin/python of the source tree, made by "
                  "scripts/bench_setup.sh)");
  sub->add_option("--cold-margin", o->cold_margin,
                  "Decode rows rotate over copies of the layer until the others read this many "
                  "times the last-level cache between two calls on one copy (default 2)")
      ->check(CLI::Range(0.0, 64.0));
  sub->add_flag("--no-dist", o->no_dist,
                "Do not run the expert-parallel rows (mpirun -np 2 and 4 of moe_dist_bench)");
  sub->add_flag("--quick", o->quick, "Small sizes: a smoke test that runs in seconds");
  sub->add_flag("--json", o->json_out,
                "One JSON object per configuration on stdout (goals go to stderr)");
  sub->add_option("--peer-script", o->peer_script,
                  "Path of moe_peer.py (default: bench/peers/moe_peer.py of the source tree)");
  sub->add_option("--mem-fraction", o->mem_fraction,
                  "Skip a configuration that needs more than this share of MemAvailable")
      ->check(CLI::Range(0.05, 1.0));
  sub->footer(
      "Every figure is measured in this run beside its roof. The PyTorch and transformers peers "
      "run under MOE_PYTHON, else the project's .venv/bin/python, else /usr/bin/python3, with "
      "OPENBLAS_CORETYPE=Cooperlake, when torch is installed there; the kt-kernel peer under "
      "--kt-python (scripts/bench_setup.sh makes .venv-kt/).");
  sub->callback([o, &status] { status = run_bench(*o); });
}

}  // namespace moe::cli
