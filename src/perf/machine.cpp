#include "perf/machine.hpp"

#include <dirent.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

namespace moe::perf {

const std::vector<std::string> kIsaFlags = {
    "avx2",        "fma",         "avx512f",  "avx512bw", "avx512vl",    "avx512_vnni",
    "avx512_vbmi", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"};

namespace {

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) return "";
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) out.emplace_back(e->d_name);
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

}  // namespace

std::string cpuinfo_field(const std::string& cpuinfo, const std::string& key) {
  std::istringstream in(cpuinfo);
  std::string line;
  while (std::getline(in, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    if (trim(line.substr(0, colon)) == key) return trim(line.substr(colon + 1));
  }
  return "";
}

std::vector<std::string> isa_flags(const std::string& flags_line) {
  std::set<std::string> have;
  std::istringstream in(flags_line);
  for (std::string f; in >> f;) {
    have.insert(f);
    f.erase(std::remove(f.begin(), f.end(), '_'), f.end());
    have.insert(f);
  }
  std::vector<std::string> out;
  for (const std::string& flag : kIsaFlags) {
    std::string bare = flag;
    bare.erase(std::remove(bare.begin(), bare.end(), '_'), bare.end());
    if (have.count(flag) || have.count(bare)) out.push_back(flag);
  }
  return out;
}

int64_t parse_size_bytes(const std::string& text) {
  const std::string s = trim(text);
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return -1;
  const double v = std::stod(s.substr(0, i));
  while (i < s.size() && s[i] == ' ') ++i;
  double mult = 1.0;
  if (i < s.size()) {
    switch (std::toupper(static_cast<unsigned char>(s[i]))) {
      case 'K': mult = 1024.0; break;
      case 'M': mult = 1024.0 * 1024.0; break;
      case 'G': mult = 1024.0 * 1024.0 * 1024.0; break;
      case 'B': case '(': mult = 1.0; break;
      default: return -1;
    }
  }
  return static_cast<int64_t>(std::llround(v * mult));
}

CacheSize llc_from_sysfs(const std::string& cpu_dir) {
  // level -> (size of one instance, the distinct CPU lists sharing an instance)
  std::map<int, std::pair<int64_t, std::set<std::string>>> levels;
  for (const std::string& cpu : list_dir(cpu_dir)) {
    if (!starts_with(cpu, "cpu") || cpu.size() < 4 ||
        !std::isdigit(static_cast<unsigned char>(cpu[3])))
      continue;
    const std::string cache = cpu_dir + "/" + cpu + "/cache";
    for (const std::string& idx : list_dir(cache)) {
      if (!starts_with(idx, "index")) continue;
      const std::string dir = cache + "/" + idx;
      const std::string type = trim(read_file(dir + "/type"));
      if (type == "Instruction" || type == "Data") continue;
      const std::string level_s = trim(read_file(dir + "/level"));
      const int64_t size = parse_size_bytes(read_file(dir + "/size"));
      if (level_s.empty() || size <= 0) continue;
      const int level = std::atoi(level_s.c_str());
      std::string shared = trim(read_file(dir + "/shared_cpu_list"));
      if (shared.empty()) shared = cpu;  // unknown sharing: one instance per CPU
      auto& entry = levels[level];
      entry.first = std::max(entry.first, size);
      entry.second.insert(shared);
    }
  }
  CacheSize c;
  if (levels.empty()) return c;
  const auto& [level, entry] = *levels.rbegin();
  c.level = level;
  c.instances = static_cast<int>(entry.second.size());
  c.bytes = entry.first * c.instances;
  return c;
}

CacheSize llc_from_lscpu(const std::string& lscpu_text) {
  CacheSize c;
  std::istringstream in(lscpu_text);
  std::string line;
  while (std::getline(in, line)) {
    const std::string t = trim(line);
    // "L2 cache:", "L3 cache:"; "L1d cache:" / "L1i cache:" are split caches, skipped.
    if (t.size() < 9 || t[0] != 'L' || !std::isdigit(static_cast<unsigned char>(t[1])) ||
        t.compare(2, 7, " cache:") != 0)
      continue;
    const int level = t[1] - '0';
    const int64_t bytes = parse_size_bytes(t.substr(9));
    if (bytes <= 0 || level < c.level) continue;
    c.level = level;
    c.bytes = bytes;  // lscpu's summary is the total over the instances
    const auto open = t.find('(');
    c.instances = open == std::string::npos ? 1 : std::max(1, std::atoi(t.c_str() + open + 1));
  }
  return c;
}

MachineInfo read_machine_info() {
  MachineInfo m;
  const std::string cpuinfo = read_file("/proc/cpuinfo");
  m.cpu_model = cpuinfo_field(cpuinfo, "model name");
  m.vendor = cpuinfo_field(cpuinfo, "vendor_id");
  m.isa = isa_flags(cpuinfo_field(cpuinfo, "flags"));
  const auto has = [&](const char* f) {
    return std::find(m.isa.begin(), m.isa.end(), f) != m.isa.end();
  };
  m.amx = has("amx_tile") && has("amx_bf16") && has("amx_int8");
  m.cpus = static_cast<int>(std::thread::hardware_concurrency());
  const std::string sys = "/sys/devices/system/cpu";
  CacheSize c = llc_from_sysfs(sys);
  if (c.bytes > 0) {
    m.llc_source = "sysfs " + sys + "/cpu*/cache";
  } else if (FILE* p = ::popen("lscpu -B 2>/dev/null || lscpu 2>/dev/null", "r")) {
    std::string out;
    char buf[4096];
    while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    ::pclose(p);
    c = llc_from_lscpu(out);
    if (c.bytes > 0) m.llc_source = "lscpu";
  }
  if (c.bytes <= 0) m.llc_source = "unknown (neither sysfs nor lscpu gave a size)";
  m.llc_bytes = std::max<int64_t>(c.bytes, 0);
  m.llc_level = c.level;
  m.llc_instances = c.instances;
  return m;
}

int cold_layer_count(int64_t bytes_per_call, int64_t llc_bytes, double margin) {
  if (bytes_per_call <= 0) return 1;
  const double llc = static_cast<double>(llc_bytes > 0 ? llc_bytes : kUnknownLlcBytes);
  const double n = std::ceil(margin * llc / static_cast<double>(bytes_per_call));
  return static_cast<int>(std::max(1.0, n));
}

}  // namespace moe::perf
