// The one place that knows the CPU (STYLE.md 16): cpuid, the OS's consent to the wide
// register states (XCR0) and to AMX's tile data (Linux's arch_prctl permission), and the one
// cap MOE_MAX_ISA. Every kernel choice of the library reads cpu().level; nothing else calls
// cpuid or __builtin_cpu_supports.
//
// The build has no -march=native: the code is compiled for the project's baseline
// (x86-64-v3: AVX2 and FMA, CMake's MOE_ARCH) and each wider kernel carries its own target
// attribute, so one binary runs on an AVX2-only CPU and uses AVX-512, AVX512-BF16 and AMX
// where the CPU has them.
//
// Levels, each including the ones below it:
//   avx2         AVX2 + FMA (the baseline; oneDNN held to avx2)
//   avx512       AVX-512 F/BW/VL/DQ, and VNNI where the CPU has it (the int8 kernel)
//   avx512_bf16  + AVX512-BF16 (vdpbf16ps: the bf16 products)
//   amx          + AMX-TILE, AMX-BF16, AMX-INT8 with the OS's permission (tdpbf16ps, tdpbusd)
// MOE_MAX_ISA=<level> lowers the level (never raises it) for libmoe's kernels and for
// oneDNN's (dnnl_set_max_cpu_isa, before oneDNN's first use), e.g. to test the lower paths
// on a wider CPU. An unknown value is an error naming the accepted ones.
//
// MOE_AMX_EMULATE=1 runs the AMX kernels through the plain C++ twin of the tile instructions
// (kernels/amx_tile.hpp) whatever the CPU: the tests use it to run every AMX kernel, and the
// whole layer on it, on machines without AMX. It is a test mode (slow), not a level.
#pragma once
#include <cstdint>
#include <string>

namespace moe::detail {

enum class Isa : int { avx2 = 0, avx512 = 1, avx512_bf16 = 2, amx = 3 };

// What cpuid and the OS report, before any cap.
struct CpuFeatures {
  bool avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool avx512_vbmi = false;  // vpermi2b (fp8's decode widening)
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false;     // XCR0: XMM and YMM state
  bool os_avx512 = false;  // XCR0: opmask and ZMM state
  bool os_amx = false;     // XCR0: tile config and data, and Linux granted the tile data
};

struct CpuInfo {
  CpuFeatures has;
  std::string model;      // the CPU's brand string
  Isa best = Isa::avx2;   // the highest level this CPU and OS support
  Isa level = Isa::avx2;  // best, lowered by MOE_MAX_ISA
  std::string cap;        // MOE_MAX_ISA as given ("" when unset)
  bool amx_emulated = false;  // MOE_AMX_EMULATE=1
  // Products with fewer rows than this stay on the streaming AVX-512 kernels where AMX is
  // chosen (decode: the weights' bytes bound both). MOE_AMX_MIN_ROWS=<n> sets it (n ≥ 1).
  int64_t amx_min_rows = 4;
  // oneDNN's own cap as libmoe set it ("" when libmoe left it alone), for reports.
  std::string onednn_cap;
};

// Read once (thread-safe); throws moe::Error on an invalid MOE_MAX_ISA or MOE_AMX_MIN_ROWS,
// every call made outside a parallel region.
const CpuInfo& cpu();
// The same check for the public boundary (RouterConfig/MoEConfig::validate): every call into
// the kernels passes one first, so the error never has to leave a parallel region.
void check_cpu_settings();

inline bool isa_at_least(Isa want) { return static_cast<int>(cpu().level) >= static_cast<int>(want); }
// The AMX kernels run: on the instructions (level amx) or on their emulation (MOE_AMX_EMULATE).
inline bool amx_kernels() { return cpu().level == Isa::amx || cpu().amx_emulated; }
// The AMX kernels run on the real instructions (false: emulated, or not at all).
inline bool amx_hardware() { return cpu().level == Isa::amx && !cpu().amx_emulated; }
// The int8 VNNI kernel may run (AVX-512 level and the CPU has VNNI).
inline bool vnni_kernels() { return isa_at_least(Isa::avx512) && cpu().has.avx512_vnni; }

const char* isa_name(Isa isa);
// Parses a level name as MOE_MAX_ISA takes it; false when it is none.
bool parse_isa(const std::string& s, Isa* out);

// Tests only: until it ends, the level is `level` (never above cpu().best) and the AMX
// kernels run emulated when amx_emulated, in this process, so that one test binary runs
// every kernel the CPU allows. oneDNN keeps the cap it got at its first use. Not to be used
// while kernels run on other threads.
class IsaOverride {
 public:
  IsaOverride(Isa level, bool amx_emulated);
  ~IsaOverride();
  IsaOverride(const IsaOverride&) = delete;
  IsaOverride& operator=(const IsaOverride&) = delete;

 private:
  Isa level_;
  bool emulated_;
};

// Asks Linux for permission to use AMX tile data in this process (once); true when granted.
// cpu() calls it; exposed for the tests.
bool request_amx_permission();

}  // namespace moe::detail
