// `moe bench --model PATH --layer N [--tokens T]` and `moe bench --config real-models`: the MoE
// block of a Hugging Face checkpoint, loaded by load_pretrained, beside its roofs, beside the
// family's own `transformers` module (bench/peers/hf_block.py), and its load time beside the
// time to read the block's bytes from disk.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "bench.hpp"
#include "common/huge_pages.hpp"
#include "moe/error.hpp"
#include "moe/pretrained.hpp"

namespace moe::cli::bench {

namespace {

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open");
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// A byte range of one file.
struct Range {
  std::string file;
  uint64_t begin = 0, end = 0;
};

// The byte ranges of decoder layer `layer`'s MoE block in the folder's safetensors files: the
// tensors whose names start with "model.layers.<layer>." and lie in the block (".mlp." or
// ".block_sparse_moe."), from the files' own headers.
std::vector<Range> block_ranges(const std::string& dir, int64_t layer) {
  std::vector<std::string> files;
  const std::string index = dir + "/model.safetensors.index.json";
  if (exists(index)) {
    const json j = json::parse(read_text(index));
    for (const auto& [name, file] : j.at("weight_map").items()) {
      const std::string f = file.get<std::string>();
      if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
    }
  } else {
    files.push_back("model.safetensors");
  }
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  std::vector<Range> out;
  for (const std::string& f : files) {
    const std::string path = dir + "/" + f;
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open");
    uint8_t len8[8];
    in.read(reinterpret_cast<char*>(len8), 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | len8[i];
    if (!in || n > (uint64_t{100} << 20)) throw Error(path + ": not a safetensors file");
    std::string header(n, '\0');
    in.read(header.data(), static_cast<std::streamsize>(n));
    const json h = json::parse(header);
    for (const auto& [name, t] : h.items()) {
      if (name == "__metadata__" || name.rfind(prefix, 0) != 0) continue;
      if (name.find(".mlp.") == std::string::npos &&
          name.find(".block_sparse_moe.") == std::string::npos)
        continue;
      const auto off = t.at("data_offsets");
      out.push_back({path, 8 + n + off[0].get<uint64_t>(), 8 + n + off[1].get<uint64_t>()});
    }
  }
  return out;
}

// Drops the files' pages from the page cache, so that the next read comes from the disk.
void evict(const std::vector<Range>& ranges) {
  std::vector<std::string> done;
  for (const Range& r : ranges) {
    if (std::find(done.begin(), done.end(), r.file) != done.end()) continue;
    done.push_back(r.file);
    const int fd = ::open(r.file.c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Reads the ranges with pread into one reusable buffer: the time the disk (or, when the
// eviction did not take, the page cache) needs to deliver the block's bytes.
double read_ranges_s(const std::vector<Range>& ranges, uint64_t& bytes) {
  std::vector<char> buf(size_t{64} << 20);
  bytes = 0;
  const double t0 = perf::now_s();
  for (const Range& r : ranges) {
    const int fd = ::open(r.file.c_str(), O_RDONLY);
    if (fd < 0) throw Error(r.file + ": cannot open");
    for (uint64_t at = r.begin; at < r.end;) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(buf.size(), r.end - at));
      const ssize_t got = ::pread(fd, buf.data(), want, static_cast<off_t>(at));
      if (got <= 0) {
        ::close(fd);
        throw Error(r.file + ": short read");
      }
      at += static_cast<uint64_t>(got);
      bytes += static_cast<uint64_t>(got);
    }
    ::close(fd);
  }
  return perf::now_s() - t0;
}

}  // namespace

std::vector<BenchCase> model_cases(const std::string& dir, int64_t layer, int64_t T,
                                   Precision p, const std::string& label) {
  MoEConfig cfg = pretrained_config(dir, layer);
  cfg.precision = p;
  std::vector<BenchCase> out;
  // Prefill at T, then decode at 1, 4 and 16 tokens (those below T), measured cold.
  std::vector<int64_t> ts = {T};
  for (const int64_t t : {int64_t{1}, int64_t{4}, int64_t{16}})
    if (t < T) ts.push_back(t);
  if (T == 1) ts = {1};
  for (const int64_t t : ts) {
    const bool decode = t <= 16 && (t < T || T == 1);
    BenchCase c;
    c.name = label + (!decode ? "-T" + std::to_string(t)
                              : t == 1 ? std::string("-decode")
                                       : "-decode-T" + std::to_string(t));
    c.group = "model";
    c.cfg = cfg;
    c.T = t;
    c.training = false;
    c.backward = false;
    c.weights_roof = !decode;
    c.memory_roof = decode;
    c.model_dir = dir;
    c.model_layer = layer;
    out.push_back(c);
  }
  return out;
}

std::string make_checkpoint(const std::string& model, const std::string& parent, bool quick,
                            std::string& note) {
  const std::string dir = parent + "/" + model + (quick ? "-quick" : "");
  if (exists(dir + "/config.json") && exists(dir + "/model.safetensors.index.json")) return dir;
  const std::string cmd = shell_quote(peer_python()) + " " +
                          shell_quote(std::string(MOE_SOURCE_DIR) +
                                      "/bench/peers/make_checkpoint.py") +
                          " --model " + shell_quote(model) + " --out " + shell_quote(dir) +
                          (quick ? " --quick" : "");
  int rc = 0;
  const json res = run_json_command(cmd, rc);
  if (rc != 0 || res.is_discarded() || !res.contains("dir")) {
    note = "could not write the checkpoint (status " + std::to_string(rc) + "; needs torch and "
           "safetensors in " + peer_python() + ")";
    return "";
  }
  return dir;
}

void run_hf_peer(Result& r, const BenchOptions& o, int threads) {
  const BenchCase& c = r.c;
  const std::string cmd =
      shell_quote(peer_python()) + " " +
      shell_quote(std::string(MOE_SOURCE_DIR) + "/bench/peers/hf_block.py") + " --model " +
      shell_quote(c.model_dir) + " --layer " + std::to_string(c.model_layer) + " --tokens " +
      std::to_string(c.T) + " --threads " + std::to_string(threads) + " --repeat " +
      std::to_string(std::max(o.repeat, 1)) + " --dtype " +
      (c.cfg.precision == Precision::fp32 ? "fp32" : "bf16") +
      // Cold decode: as many copies of the block as libmoe's row rotated over.
      " --layers " + std::to_string(c.memory_roof ? std::max(r.cold_layers, 1) : 1);
  int rc = 0;
  const json res = run_json_command(cmd, rc);
  if (rc != 0 || res.is_discarded() || !res.contains("fwd_s")) {
    r.peer_note = "n/a (transformers peer failed, status " + std::to_string(rc) + ")";
    return;
  }
  r.peer_fwd_s = res["fwd_s"].get<double>();
  r.peer_blas = "transformers " + res.value("transformers", std::string("?")) + " " +
                res.value("impl", std::string("?")) + " experts";
}

// Seconds to allocate `bytes` of new memory as the layer's packed weights are allocated
// (common/huge_pages.hpp) and write every page of it once, over the benchmark's threads.
double touch_new_memory_s(size_t bytes) {
  const double t0 = perf::now_s();
  auto* p = static_cast<unsigned char*>(detail::huge_alloc(bytes));
  const int64_t pages = static_cast<int64_t>(bytes / 4096);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < pages; ++i) p[i * 4096] = 1;
  const double t = perf::now_s() - t0;
  detail::huge_free(p, bytes);
  return t;
}

LoadTiming measure_load(const std::string& dir, int64_t layer, Precision p, int repeat) {
  LoadTiming lt;
  const auto ranges = block_ranges(dir, layer);
  if (ranges.empty()) {
    lt.note = "no tensors of layer " + std::to_string(layer) + " found";
    return lt;
  }
  uint64_t block_bytes = 0;
  for (const Range& r : ranges) block_bytes += r.end - r.begin;
  std::vector<double> load, read, touch;
  for (int i = 0; i < std::max(repeat, 1); ++i) {
    uint64_t bytes = 0;
    touch.push_back(touch_new_memory_s(static_cast<size_t>(block_bytes)));
    evict(ranges);
    read.push_back(read_ranges_s(ranges, bytes));
    lt.bytes = static_cast<int64_t>(bytes);
    evict(ranges);
    const double t0 = perf::now_s();
    { MoELayer l = load_pretrained(dir, layer, p); }
    load.push_back(perf::now_s() - t0);
  }
  lt.load_s = perf::median(load);
  lt.read_s = perf::median(read);
  lt.touch_s = perf::median(touch);
  return lt;
}

}  // namespace moe::cli::bench
