// The machine a benchmark ran on, as `moe bench` names it in its report header: the CPU's model
// string, the instruction-set flags that decide which kernels can run, and the size of the
// last-level cache (what a cold decode measurement must read past). Read from /proc/cpuinfo
// and sysfs (lscpu's text as a fallback); the parsers take text or a folder so that the tests
// can give them another machine's.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moe::perf {

struct MachineInfo {
  std::string cpu_model;         // "model name" of /proc/cpuinfo ("AMD EPYC", "Intel(R) Xeon(R) ...")
  std::string vendor;            // "vendor_id" ("AuthenticAMD", "GenuineIntel")
  std::vector<std::string> isa;  // the kernel-relevant flags present, in kIsaFlags order
  bool amx = false;              // amx_tile, amx_bf16 and amx_int8 all present
  int cpus = 0;                  // online CPUs
  int64_t llc_bytes = 0;         // the last-level cache, all its instances together; 0: unknown
  int llc_level = 0;             // 3 for an L3
  int llc_instances = 0;
  std::string llc_source;        // where the size came from ("sysfs ...", "lscpu", or why unknown)
};

// The flags reported, in this order: what separates the kernels (AVX2 … AMX).
extern const std::vector<std::string> kIsaFlags;

// The value of the first "key : value" line of /proc/cpuinfo's text; empty when absent.
std::string cpuinfo_field(const std::string& cpuinfo, const std::string& key);
// The kIsaFlags present in a space-separated flags line (either spelling: avx512_bf16 /
// avx512bf16).
std::vector<std::string> isa_flags(const std::string& flags_line);
// "32768K", "1024K", "32 MiB", "480 MiB (1 instance)", "33554432", "2M" -> bytes; -1 when no
// size can be read.
int64_t parse_size_bytes(const std::string& text);

struct CacheSize {
  int64_t bytes = 0;  // all instances of the level together; 0: none found
  int level = 0;
  int instances = 0;
};
// The highest cache level of sysfs' cpu folder (normally /sys/devices/system/cpu): each
// cpuN/cache/indexM with its level, type (Data and Instruction caches are skipped) and size;
// distinct shared_cpu_list values count the instances.
CacheSize llc_from_sysfs(const std::string& cpu_dir);
// The same from lscpu's summary ("L3 cache:  32 MiB (1 instance)"), the highest level listed.
CacheSize llc_from_lscpu(const std::string& lscpu_text);

// This machine: /proc/cpuinfo, sysfs, else `lscpu`.
MachineInfo read_machine_info();

// Cold decode: how many independent copies of a layer a benchmark rotates over so that, between
// two calls on the same copy, the calls on the others read at least margin × the last-level
// cache. Each call reads bytes_per_call; over a rotation of n copies the bytes read between two
// uses of a weight are n × bytes_per_call, so n = ceil(margin · llc / bytes_per_call), at least
// 1 (a call that reads more than that already evicts its own start). An unknown cache size
// (llc_bytes <= 0) counts as 512 MiB, more than any CPU of the project's machines reports.
int cold_layer_count(int64_t bytes_per_call, int64_t llc_bytes, double margin = 2.0);
constexpr int64_t kUnknownLlcBytes = int64_t{512} << 20;

}  // namespace moe::perf
