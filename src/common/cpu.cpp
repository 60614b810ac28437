#include "common/cpu.hpp"

#include <cpuid.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/check.hpp"

namespace moe::detail {

namespace {

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
Regs cpuid(unsigned leaf, unsigned sub = 0) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}
bool bit(unsigned v, int i) { return (v >> i) & 1u; }

uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

std::string brand() {
  if (cpuid(0x80000000).a < 0x80000004) return "unknown x86-64";
  char s[49] = {};
  for (unsigned i = 0; i < 3; ++i) {
    const Regs r = cpuid(0x80000002 + i);
    std::memcpy(s + 16 * i, &r, 16);
  }
  std::string out(s);
  const size_t first = out.find_first_not_of(' ');
  return first == std::string::npos ? "unknown x86-64" : out.substr(first);
}

CpuFeatures read_features() {
  CpuFeatures f;
  const unsigned max_leaf = cpuid(0).a;
  const Regs l1 = cpuid(1);
  const bool osxsave = bit(l1.c, 27);
  const uint64_t x = osxsave ? xcr0() : 0;
  f.os_avx = (x & 0x6) == 0x6;
  f.os_avx512 = f.os_avx && (x & 0xE0) == 0xE0;
  const bool os_tiles = (x & (3ull << 17)) == (3ull << 17);
  f.fma = bit(l1.c, 12) && f.os_avx;
  if (max_leaf < 7) return f;
  const Regs l7 = cpuid(7, 0);
  f.avx2 = bit(l7.b, 5) && f.os_avx;
  f.avx512f = bit(l7.b, 16) && f.os_avx512;
  f.avx512dq = bit(l7.b, 17) && f.os_avx512;
  f.avx512bw = bit(l7.b, 30) && f.os_avx512;
  f.avx512vl = bit(l7.b, 31) && f.os_avx512;
  f.avx512_vnni = bit(l7.c, 11) && f.os_avx512;
  f.avx512_vbmi = bit(l7.c, 1) && f.os_avx512;
  f.amx_bf16 = bit(l7.d, 22);
  f.amx_tile = bit(l7.d, 24);
  f.amx_int8 = bit(l7.d, 25);
  if (l7.a >= 1) f.avx512_bf16 = bit(cpuid(7, 1).a, 5) && f.os_avx512;
  f.os_amx = os_tiles && f.amx_tile && request_amx_permission();
  return f;
}

Isa best_level(const CpuFeatures& f) {
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  if (!avx512) return Isa::avx2;
  if (!f.avx512_bf16) return Isa::avx512;
  if (!(f.amx_tile && f.amx_bf16 && f.amx_int8 && f.os_amx)) return Isa::avx512_bf16;
  return Isa::amx;
}

// oneDNN held to the level: its ISA names for each.
dnnl_cpu_isa_t onednn_isa(Isa level, const CpuFeatures& f) {
  switch (level) {
    case Isa::avx2: return dnnl_cpu_isa_avx2;
    case Isa::avx512: return f.avx512_vnni ? dnnl_cpu_isa_avx512_core_vnni : dnnl_cpu_isa_avx512_core;
    case Isa::avx512_bf16: return dnnl_cpu_isa_avx512_core_bf16;
    case Isa::amx: return dnnl_cpu_isa_avx512_core_amx;
  }
  return dnnl_cpu_isa_all;
}

struct State {
  CpuInfo info;
  std::string error;  // an invalid MOE_MAX_ISA
  State() {
    info.has = read_features();
    info.model = brand();
    info.best = info.level = best_level(info.has);
    const char* cap = std::getenv("MOE_MAX_ISA");
    if (cap && *cap) {
      info.cap = cap;
      Isa want;
      if (!parse_isa(info.cap, &want)) {
        error = cat("MOE_MAX_ISA: '", info.cap,
                    "' is not a level; accepted: avx2, avx512, avx512_bf16, amx");
        return;
      }
      if (static_cast<int>(want) < static_cast<int>(info.level)) {
        info.level = want;
        // Before oneDNN's first primitive (cpu() is called first by every path into oneDNN);
        // when oneDNN's own ONEDNN_MAX_CPU_ISA was given too, oneDNN keeps the lower.
        const dnnl_cpu_isa_t isa = onednn_isa(want, info.has);
        if (dnnl_set_max_cpu_isa(isa) == dnnl_success) info.onednn_cap = isa_name(want);
      }
    }
    if (const char* rows = std::getenv("MOE_AMX_MIN_ROWS"); rows && *rows) {
      char* end = nullptr;
      const long long v = std::strtoll(rows, &end, 10);
      if (*end != '\0' || v < 1) {
        error = cat("MOE_AMX_MIN_ROWS: '", rows, "' is not a row count (an integer ≥ 1)");
        return;
      }
      info.amx_min_rows = v;
    }
    const char* emu = std::getenv("MOE_AMX_EMULATE");
    info.amx_emulated = emu && *emu && std::strcmp(emu, "0") != 0;
  }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

bool request_amx_permission() {
  // Linux 5.16+: tile data is a dynamically enabled state a process must ask for
  // (ARCH_REQ_XCOMP_PERM with XFEATURE_XTILEDATA) before its first tile instruction.
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

const CpuInfo& cpu() {
  const State& s = state();
  // An exception cannot leave a parallel region: there the settings were checked already at
  // the boundary (check_cpu_settings, from the configs' validate()).
  MOE_REQUIRE(s.error.empty() || omp_in_parallel(), s.error);
  return s.info;
}

void check_cpu_settings() { (void)cpu(); }

IsaOverride::IsaOverride(Isa level, bool amx_emulated) {
  CpuInfo& info = state().info;
  level_ = info.level;
  emulated_ = info.amx_emulated;
  info.level = static_cast<int>(level) < static_cast<int>(info.best) ? level : info.best;
  info.amx_emulated = amx_emulated;
}

IsaOverride::~IsaOverride() {
  CpuInfo& info = state().info;
  info.level = level_;
  info.amx_emulated = emulated_;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::amx: return "amx";
  }
  return "?";
}

bool parse_isa(const std::string& s, Isa* out) {
  for (Isa i : {Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx})
    if (s == isa_name(i)) {
      *out = i;
      return true;
    }
  return false;
}

}  // namespace moe::detail
