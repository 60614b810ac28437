// `moe bench`: the report header — the machine every figure of the run comes from (CPU model
// string, the ISA flags that decide the kernels), its last-level cache (what the cold decode
// rows rotate past) and the read roof's patterns, the fastest named.
#include <iomanip>
#include <ostream>
#include <string>

#include "bench.hpp"
#include "common/cpu.hpp"
#include "common/gemm.hpp"
#include "common/gemm_bf16_packed.hpp"
#include "experts/int8.hpp"
#include "experts/lowbit.hpp"

namespace moe::cli::bench {

namespace {

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

// The kernels libmoe chose on this machine, one line each, from the CPU module
// (common/cpu.hpp): the level (and MOE_MAX_ISA when it lowered it), then each precision's
// kernel. Both the table's header and the JSON's "machine" object print these.
std::vector<std::string> kernel_report_lines() {
  const detail::CpuInfo& c = detail::cpu();
  std::string level = std::string("level ") + detail::isa_name(c.level) + " (best on this CPU: " +
                      detail::isa_name(c.best);
  if (!c.cap.empty()) level += ", MOE_MAX_ISA=" + c.cap;
  if (c.amx_emulated) level += ", MOE_AMX_EMULATE=1: AMX kernels emulated, not for timing";
  level += ")";
  return {level,
          std::string("bf16 experts: ") + detail::gemm_bf16_packed_impl() +
              (c.level == detail::Isa::amx ? ", from " + std::to_string(c.amx_min_rows) +
                                                 " rows (MOE_AMX_MIN_ROWS)"
                                           : std::string()),
          std::string("int8 experts: ") + detail::int8_kernel_name(),
          std::string("int4 experts: ") + detail::lowbit_kernel_names(Precision::int4),
          std::string("mxfp4 experts: ") + detail::lowbit_kernel_names(Precision::mxfp4),
          std::string("fp8 experts: ") + detail::lowbit_kernel_names(Precision::fp8),
          std::string("fp32 products and roofs: oneDNN ") + detail::cpu_isa_name()};
}

}  // namespace

void print_machine_header(std::ostream& os, const perf::MachineInfo& m,
                          const perf::ReadRoof* roof) {
  os << "machine: " << (m.cpu_model.empty() ? "unknown CPU" : m.cpu_model);
  if (!m.vendor.empty()) os << " (" << m.vendor << ")";
  os << ", " << m.cpus << " CPU(s)\n";
  os << "ISA flags: " << (m.isa.empty() ? "none of the kernel-relevant ones" : join(m.isa))
     << (m.amx ? "" : "  [no AMX]") << '\n';
  os << "last-level cache: ";
  if (m.llc_bytes > 0)
    os << "L" << m.llc_level << " " << fmt(static_cast<double>(m.llc_bytes) / 1048576.0, 1)
       << " MiB in " << m.llc_instances << " instance(s), from " << m.llc_source << '\n';
  else
    os << m.llc_source << "; cold decode assumes "
       << perf::kUnknownLlcBytes / 1048576 << " MiB\n";
  for (const std::string& line : kernel_report_lines()) os << "kernels: " << line << '\n';
  if (roof && !roof->results().empty()) {
    os << "read roof: " << fmt(roof->bytes() / 1073741824.0, 2) << " GiB buffer, best of "
       << roof->results().size() << " patterns: " << roof->pattern().name() << '\n';
    for (const perf::ReadPatternResult& p : roof->results())
      os << "  " << std::setw(46) << std::left << p.pattern.name() << std::right << ' '
         << fmt(p.bytes_per_s / 1e9, 1) << " GB/s"
         << (p.pattern.name() == roof->pattern().name() ? "  <- roof" : "") << '\n';
  }
}

json machine_json(const perf::MachineInfo& m, const perf::ReadRoof* roof) {
  json j = {{"cpu_model", m.cpu_model},   {"vendor", m.vendor},       {"cpus", m.cpus},
            {"isa", m.isa},               {"amx", m.amx},             {"llc_bytes", m.llc_bytes},
            {"llc_level", m.llc_level},   {"llc_instances", m.llc_instances},
            {"llc_source", m.llc_source}, {"kernels", kernel_report_lines()}};
  if (roof && !roof->results().empty()) {
    json pats = json::array();
    for (const perf::ReadPatternResult& p : roof->results())
      pats.push_back({{"pattern", p.pattern.name()}, {"gbps", p.bytes_per_s / 1e9}});
    j["read_patterns"] = pats;
    j["read_pattern"] = roof->pattern().name();
  }
  return j;
}

}  // namespace moe::cli::bench
