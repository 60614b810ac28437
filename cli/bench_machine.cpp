// `moe bench`: the report header — the machine every figure of the run comes from (CPU model
// string, the ISA flags that decide the kernels), its last-level cache (what the cold decode
// rows rotate past) and the read roof's patterns, the fastest named.
#include <iomanip>
#include <ostream>
#include <string>

#include "bench.hpp"

namespace moe::cli::bench {

namespace {

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

// The kernels libmoe chose on this machine, one line each ("bf16 experts: ...", "int8: ...").
// THE place for them: the CPU-feature module (issue 20, item 1) returns its report here, and
// both the table's header and the JSON's "machine" object print what this returns. Empty until
// that module exists.
std::vector<std::string> kernel_report_lines() { return {}; }

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
