// The benchmark helpers of src/perf/: the streaming read kernel must read every element
// (else the bandwidth it reports is fiction), the FLOP and byte counts must match the
// formulas of the benchmark suite and the layer's real parameters, and the configurations
// must be B1, B2, B3 and the E-sweep as documented. No timing is asserted.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moe/layer.hpp"
#include "perf/machine.hpp"
#include "perf/roofline.hpp"
#include "perf/suite.hpp"

#include <omp.h>

namespace {

using moe::perf::BenchCase;
using moe::MoEConfig;

TEST(BenchPerf, StreamReadSumReadsEveryElement) {
  // Sizes off the 16-lane step and across the fixed chunk boundary (2^18 floats).
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{17}, int64_t{1} << 18,
                    (int64_t{1} << 18) + 5, 3 * (int64_t{1} << 18) + 31}) {
    std::vector<float> v(static_cast<size_t>(n));
    double ref = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      v[static_cast<size_t>(i)] = static_cast<float>((i * 37) % 101) - 50.0f;
      ref += v[static_cast<size_t>(i)];
    }
    EXPECT_DOUBLE_EQ(moe::perf::stream_read_sum(v.data(), n), ref) << "n=" << n;
  }
}

TEST(BenchPerf, MedianOfOddAndEvenCounts) {
  EXPECT_DOUBLE_EQ(moe::perf::median({3.0, 1.0, 2.0}), 2.0);
  EXPECT_DOUBLE_EQ(moe::perf::median({4.0, 1.0, 3.0, 2.0}), 2.5);
  EXPECT_DOUBLE_EQ(moe::perf::median({}), 0.0);
}

TEST(BenchPerf, ExpertFlopsFollowTheKind) {
  moe::MoEConfig c;
  c.d_model = 3;
  c.d_ff = 5;
  c.d_out = 7;
  c.expert = moe::ExpertKind::linear_relu;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * 3 * 7);
  c.expert = moe::ExpertKind::mlp;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * (3 * 5 + 5 * 7));
  c.expert = moe::ExpertKind::swiglu;
  EXPECT_DOUBLE_EQ(moe::perf::expert_flops(c, 11), 2.0 * 11 * (2 * 3 * 5 + 5 * 7));
}

TEST(BenchPerf, RouterFlopsDoubleOnlyForLearnedNoiseInTraining) {
  moe::MoEConfig c;
  c.d_model = 4;
  c.n_experts = 6;
  c.noise = moe::Noise::learned;
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, true), 2.0 * 2 * 10 * 4 * 6);
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, false), 2.0 * 10 * 4 * 6);
  c.noise = moe::Noise::fixed;
  EXPECT_DOUBLE_EQ(moe::perf::router_flops(c, 10, true), 2.0 * 10 * 4 * 6);
}

TEST(BenchPerf, ConfigurationsAndTheirShapes) {
  const auto cases = moe::perf::bench_cases(false);
  std::vector<std::string> names;
  for (const auto& c : cases) names.push_back(c.name);
  EXPECT_EQ(names, (std::vector<std::string>{"B1", "B2", "B3-T1", "B3-T4", "B3-T16", "E8", "E64",
                                             "E256", "E1024", "Qwen3-30B-A3B",
                                             "Mixtral-8x7B"}));
  const BenchCase& b1 = cases[0];
  EXPECT_EQ(b1.T, 4096);
  EXPECT_EQ(b1.cfg.d_model, 1024);
  EXPECT_EQ(b1.cfg.hidden(), 2048);
  EXPECT_EQ(b1.cfg.n_experts, 16);
  EXPECT_EQ(b1.cfg.k, 2);
  EXPECT_EQ(b1.cfg.expert, moe::ExpertKind::mlp);
  EXPECT_EQ(b1.cfg.activation, moe::Activation::relu);
  ASSERT_TRUE(b1.cfg.capacity_factor.has_value());
  EXPECT_DOUBLE_EQ(*b1.cfg.capacity_factor, 1.25);
  EXPECT_EQ(b1.cfg.noise, moe::Noise::learned);
  EXPECT_EQ(cases[1].cfg.n_experts, 256);
  EXPECT_EQ(cases[1].cfg.hidden(), 512);
  for (int i = 2; i < 5; ++i) {
    EXPECT_EQ(cases[i].cfg.d_model, 4096);
    EXPECT_EQ(cases[i].cfg.hidden(), 14336);
    EXPECT_EQ(cases[i].cfg.expert, moe::ExpertKind::swiglu);
    EXPECT_EQ(cases[i].cfg.n_experts, 8);
    EXPECT_FALSE(cases[i].training);
    EXPECT_TRUE(cases[i].memory_roof);
  }
  // The real-model blocks: prefill of 512 tokens, swiglu, softmax then top-k renormalised,
  // dropless, bf16, evaluation, roof max(compute, weight bytes).
  for (int i : {9, 10}) {
    const MoEConfig& m = cases[i].cfg;
    EXPECT_EQ(cases[i].group, "real");
    EXPECT_EQ(cases[i].T, 512);
    EXPECT_EQ(m.expert, moe::ExpertKind::swiglu);
    EXPECT_EQ(m.router_kind, moe::RouterKind::softmax_topk);
    EXPECT_TRUE(m.renormalize);
    EXPECT_FALSE(m.capacity_factor.has_value());
    EXPECT_EQ(m.precision, moe::Precision::bf16);
    EXPECT_TRUE(cases[i].weights_roof && !cases[i].training && !cases[i].backward);
  }
  EXPECT_EQ(cases[9].cfg.d_model, 2048);
  EXPECT_EQ(cases[9].cfg.hidden(), 768);
  EXPECT_EQ(cases[9].cfg.n_experts, 128);
  EXPECT_EQ(cases[9].cfg.k, 8);
  EXPECT_EQ(cases[10].cfg.d_model, 4096);
  EXPECT_EQ(cases[10].cfg.hidden(), 14336);
  EXPECT_EQ(cases[10].cfg.n_experts, 8);
  EXPECT_EQ(cases[10].cfg.k, 2);
  // --precision bf16 alone: B1, B3-T1 and the real-model blocks, all bf16.
  std::vector<std::string> bf;
  for (const auto& c : moe::perf::default_cases(false, moe::Precision::bf16)) {
    bf.push_back(c.name);
    EXPECT_EQ(c.cfg.precision, moe::Precision::bf16);
  }
  EXPECT_EQ(bf, (std::vector<std::string>{"B1", "B3-T1", "Qwen3-30B-A3B", "Mixtral-8x7B"}));
  // bf16 reads half the weight bytes (biases stay fp32).
  MoEConfig m = b1.cfg;
  const int64_t w32 = moe::perf::expert_read_bytes(m);
  m.precision = moe::Precision::bf16;
  EXPECT_EQ(moe::perf::expert_read_bytes(m), (w32 - 4 * (2048 + 1024)) / 2 + 4 * (2048 + 1024));
  // The E-sweep keeps B1's routed FLOPs at every E.
  const double b1_flops = moe::perf::expert_flops(b1.cfg, b1.T * b1.cfg.k);
  for (size_t i = 5; i < 9; ++i)
    EXPECT_DOUBLE_EQ(moe::perf::expert_flops(cases[i].cfg, cases[i].T * cases[i].cfg.k), b1_flops);
}

TEST(BenchPerf, ParamBytesMatchTheLayersParameters) {
  // The --quick cases are small enough to build; every expert kind and noise mode appears.
  for (const BenchCase& c : moe::perf::bench_cases(true)) {
    if (c.cfg.n_experts > 64) continue;
    moe::MoELayer layer(c.cfg);
    int64_t bytes = 0;
    for (const auto& name : layer.parameter_names())
      bytes += layer.param(name).numel() * static_cast<int64_t>(sizeof(float));
    EXPECT_EQ(moe::perf::layer_param_bytes(c.cfg), bytes) << c.name;
  }
}

TEST(BenchPerf, GemmRateIsPositiveAndFinite) {
  const auto g = moe::perf::measure_sgemm_dnnl(8, 16, 32, 1);
  EXPECT_TRUE(std::isfinite(g.gflops));
  EXPECT_GT(g.gflops, 0.0);
  const auto b = moe::perf::measure_read_bandwidth(int64_t{1} << 20, 1);
  EXPECT_EQ(b.bytes, int64_t{1} << 20);
  EXPECT_GT(b.bytes_per_s, 0.0);
}

// Every read pattern of the roof reads every word: the same sum (mod 2^32) as a plain loop,
// for buffers that start off a 64-byte line, end off it, and are smaller than a line.
TEST(BenchPerf, EveryReadPatternReadsEveryWord) {
  std::vector<uint32_t> words(100003);
  for (size_t i = 0; i < words.size(); ++i) words[i] = static_cast<uint32_t>(i * 2654435761u);
  for (int64_t offset : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{17}}) {
    for (int64_t count : {int64_t{0}, int64_t{5}, int64_t{16}, int64_t{1000}, int64_t{99000}}) {
      uint32_t ref = 0;
      for (int64_t i = 0; i < count; ++i) ref += words[static_cast<size_t>(offset + i)];
      for (const moe::perf::ReadPattern& p : moe::perf::read_patterns(3)) {
        EXPECT_EQ(moe::perf::read_pattern_sum(words.data() + offset, count * 4, p), ref)
            << p.name() << " offset " << offset << " count " << count;
      }
    }
  }
}

// The AVX2 kernels too (MOE_MAX_ISA=avx2 keeps the AVX-512 ones out), on any machine with AVX2.
TEST(BenchPerf, EveryReadPatternReadsEveryWordWithAvx2Loads) {
  if (!__builtin_cpu_supports("avx2")) GTEST_SKIP() << "no AVX2";
  const char* old = std::getenv("MOE_MAX_ISA");
  const std::string saved = old ? old : "";
  ::setenv("MOE_MAX_ISA", "avx2", 1);
  std::vector<uint32_t> words(50001);
  for (size_t i = 0; i < words.size(); ++i) words[i] = static_cast<uint32_t>(i * 40503u + 7);
  for (int64_t offset : {int64_t{0}, int64_t{5}}) {
    for (int64_t count : {int64_t{3}, int64_t{48}, int64_t{49000}}) {
      uint32_t ref = 0;
      for (int64_t i = 0; i < count; ++i) ref += words[static_cast<size_t>(offset + i)];
      for (const moe::perf::ReadPattern& p : moe::perf::read_patterns(2))
        EXPECT_EQ(moe::perf::read_pattern_sum(words.data() + offset, count * 4, p), ref)
            << p.name() << " offset " << offset << " count " << count;
    }
  }
  if (old)
    ::setenv("MOE_MAX_ISA", saved.c_str(), 1);
  else
    ::unsetenv("MOE_MAX_ISA");
}

TEST(BenchPerf, ReadPatternsCoverThreadsStreamsAndLoads) {
  using Load = moe::perf::ReadPattern::Load;
  const auto one = moe::perf::read_patterns(1);
  const auto two = moe::perf::read_patterns(2);
  EXPECT_EQ(one.size(), 6u);  // 1 thread x {1, 4} streams x {plain, non-temporal, prefetch}
  EXPECT_EQ(two.size(), 12u);
  int threads2 = 0, streams4 = 0, nt = 0, pf = 0;
  for (const auto& p : two) {
    threads2 += p.threads == 2;
    streams4 += p.streams == 4;
    nt += p.load == Load::nontemporal;
    pf += p.load == Load::prefetch;
  }
  EXPECT_EQ(threads2, 6);
  EXPECT_EQ(streams4, 6);
  EXPECT_EQ(nt, 4);
  EXPECT_EQ(pf, 4);
  EXPECT_EQ(two.back().name(), "2 threads x 4 streams, prefetch 2048 B ahead");
  EXPECT_EQ(two[1].name(), "1 thread x 1 stream, non-temporal loads");
}

TEST(BenchPerf, TheRoofIsTheFastestPattern) {
  using moe::perf::ReadPatternResult;
  const auto pats = moe::perf::read_patterns(2);
  std::vector<ReadPatternResult> rs;
  const double gbps[] = {21, 24, 19, 30, 29, 22, 26, 25, 27, 18, 23, 20};
  for (size_t i = 0; i < pats.size(); ++i) rs.push_back({pats[i], gbps[i] * 1e9});
  EXPECT_EQ(moe::perf::best_read_pattern(rs), 3u);
  rs[11].bytes_per_s = 31e9;
  EXPECT_EQ(moe::perf::best_read_pattern(rs), 11u);
  rs[5].bytes_per_s = 31e9;  // a tie keeps the first
  EXPECT_EQ(moe::perf::best_read_pattern(rs), 5u);

  // A real roof: calibrate() times them all and keeps the one whose bandwidth is largest.
  moe::perf::ReadRoof roof(int64_t{4} << 20);
  const auto& got = roof.calibrate(1);
  ASSERT_EQ(got.size(), moe::perf::read_patterns(omp_get_max_threads()).size());
  const size_t best = moe::perf::best_read_pattern(got);
  EXPECT_EQ(roof.pattern().name(), got[best].pattern.name());
  for (const auto& r : got) EXPECT_GE(got[best].bytes_per_s, r.bytes_per_s);
  EXPECT_GT(roof.run_s(), 0.0);
}

TEST(BenchPerf, ColdRotationReadsPastTheLastLevelCache) {
  using moe::perf::cold_layer_count;
  const int64_t MiB = int64_t{1} << 20;
  struct Case {
    int64_t per_call, llc;
    double margin;
  };
  for (const Case& c : {Case{75 * MiB, 480 * MiB, 2.0}, Case{704 * MiB, 480 * MiB, 2.0},
                        Case{704 * MiB, 32 * MiB, 2.0}, Case{37 * MiB, 32 * MiB, 2.0},
                        Case{1 * MiB, 32 * MiB, 1.0}, Case{3 * MiB, 32 * MiB, 1.5}}) {
    const int n = cold_layer_count(c.per_call, c.llc, c.margin);
    EXPECT_GE(n, 1);
    // The copies read at least margin x the LLC between two calls on one of them ...
    EXPECT_GE(static_cast<double>(n) * c.per_call, c.margin * c.llc) << c.per_call;
    // ... and no more copies than that needs.
    if (n > 1) {
      EXPECT_LT(static_cast<double>(n - 1) * c.per_call, c.margin * c.llc) << c.per_call;
    }
  }
  EXPECT_EQ(cold_layer_count(75 * MiB, 480 * MiB, 2.0), 13);
  EXPECT_EQ(cold_layer_count(704 * MiB, 32 * MiB, 2.0), 1);
  // An unknown cache counts as 512 MiB; a call that reads nothing needs no copies.
  EXPECT_EQ(cold_layer_count(64 * MiB, 0, 1.0), 8);
  EXPECT_EQ(cold_layer_count(0, 32 * MiB, 2.0), 1);
}

TEST(BenchPerf, MachineTextParsers) {
  using moe::perf::parse_size_bytes;
  EXPECT_EQ(parse_size_bytes("32768K"), int64_t{32} << 20);
  EXPECT_EQ(parse_size_bytes("1024K\n"), int64_t{1} << 20);
  EXPECT_EQ(parse_size_bytes("32 MiB (1 instance)"), int64_t{32} << 20);
  EXPECT_EQ(parse_size_bytes("480 MiB"), int64_t{480} << 20);
  EXPECT_EQ(parse_size_bytes("33554432 (1 instance)"), int64_t{32} << 20);
  EXPECT_EQ(parse_size_bytes("1.5 GiB"), int64_t{3} << 29);
  EXPECT_EQ(parse_size_bytes("none"), -1);

  const std::string cpuinfo =
      "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum "
      "8480+\nflags\t\t: fpu sse avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 "
      "amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nmodel name\t: other\n";
  EXPECT_EQ(moe::perf::cpuinfo_field(cpuinfo, "model name"), "Intel(R) Xeon(R) Platinum 8480+");
  EXPECT_EQ(moe::perf::cpuinfo_field(cpuinfo, "vendor_id"), "GenuineIntel");
  EXPECT_EQ(moe::perf::cpuinfo_field(cpuinfo, "cache size"), "");
  EXPECT_EQ(moe::perf::isa_flags(moe::perf::cpuinfo_field(cpuinfo, "flags")),
            (std::vector<std::string>{"avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                      "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                                      "amx_int8"}));
  // The other spelling of a flag counts too.
  EXPECT_EQ(moe::perf::isa_flags("avx2 avx512bf16"),
            (std::vector<std::string>{"avx2", "avx512_bf16"}));
  EXPECT_EQ(moe::perf::isa_flags("avx512vbmi avx2"),  // /proc/cpuinfo's spelling
            (std::vector<std::string>{"avx2", "avx512_vbmi"}));

  const auto l = moe::perf::llc_from_lscpu(
      "L1d cache:   64 KiB (2 instances)\nL2 cache:    2 MiB (2 instances)\n"
      "L3 cache:    480 MiB (2 instances)\nNUMA node(s): 1\n");
  EXPECT_EQ(l.level, 3);
  EXPECT_EQ(l.bytes, int64_t{480} << 20);
  EXPECT_EQ(l.instances, 2);
}

TEST(BenchPerf, LastLevelCacheFromSysfs) {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("moe_sysfs_" + std::to_string(::getpid()));
  fs::remove_all(root);
  auto cache = [&](const std::string& cpu, int idx, int level, const char* type, const char* size,
                   const char* shared) {
    const fs::path d = root / cpu / "cache" / ("index" + std::to_string(idx));
    fs::create_directories(d);
    std::ofstream(d / "level") << level << '\n';
    std::ofstream(d / "type") << type << '\n';
    std::ofstream(d / "size") << size << '\n';
    std::ofstream(d / "shared_cpu_list") << shared << '\n';
  };
  // Four CPUs, L1d/L1i/L2 per CPU, two L3 instances of 16 MiB each shared by pairs.
  for (int c = 0; c < 4; ++c) {
    const std::string cpu = "cpu" + std::to_string(c), self = std::to_string(c);
    cache(cpu, 0, 1, "Data", "32K", self.c_str());
    cache(cpu, 1, 1, "Instruction", "32K", self.c_str());
    cache(cpu, 2, 2, "Unified", "1024K", self.c_str());
    cache(cpu, 3, 3, "Unified", "16384K", c < 2 ? "0-1" : "2-3");
  }
  fs::create_directories(root / "cpufreq");  // not a cpuN folder
  const auto c = moe::perf::llc_from_sysfs(root.string());
  EXPECT_EQ(c.level, 3);
  EXPECT_EQ(c.instances, 2);
  EXPECT_EQ(c.bytes, int64_t{32} << 20);
  fs::remove_all(root);
  EXPECT_EQ(moe::perf::llc_from_sysfs(root.string()).bytes, 0);
  // This machine: a size from somewhere, or the reason there is none.
  const auto m = moe::perf::read_machine_info();
  EXPECT_FALSE(m.llc_source.empty());
  EXPECT_GT(m.cpus, 0);
}

}  // namespace
