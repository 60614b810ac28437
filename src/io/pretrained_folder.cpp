// The model folder of the pretrained loader: config.json, the index, mapped files, and the
// decoding of stored weights (formats: pretrained_folder.hpp).
#include "io/pretrained_folder.hpp"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>

#include "common/check.hpp"
#include "common/parallel.hpp"
#include "moe/tensor.hpp"
#include "quant/fp8.hpp"
#include "quant/int4_import.hpp"
#include "quant/mxfp4.hpp"

namespace moe::detail {

namespace {

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// A small JSON file of the folder, whole, refused past `limit` bytes.
std::string read_text(const std::string& path, uint64_t limit, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw Error(cat(what, ": cannot read '", path, "' (", std::strerror(errno), ")"));
  if (static_cast<uint64_t>(st.st_size) > limit)
    throw Error(cat(what, ": '", path, "' is ", st.st_size, " bytes, more than the limit of ",
                    limit));
  std::ifstream in(path, std::ios::binary);
  std::string text(static_cast<size_t>(st.st_size), '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(text.size())))
    throw Error(cat(what, ": cannot read '", path, "'"));
  return text;
}

// A file name of the index: a plain relative path inside the folder.
bool safe_relative(const std::string& f) {
  if (f.empty() || f[0] == '/' || f.find('\0') != std::string::npos) return false;
  size_t start = 0;
  while (start <= f.size()) {
    const size_t end = std::min(f.find('/', start), f.size());
    const std::string part = f.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

}  // namespace

std::map<std::string, std::string> parse_index_json(const std::string& text,
                                                    const std::string& what) {
  const nlohmann::ordered_json idx = parse_json_checked(text, what, "the file");
  MOE_REQUIRE(idx.is_object(), what, ": expected a JSON object, got ", idx.type_name());
  const auto wm = idx.find("weight_map");
  MOE_REQUIRE(wm != idx.end() && wm->is_object(), what,
              ": missing object 'weight_map' (tensor name -> file)");
  std::map<std::string, std::string> out;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    MOE_REQUIRE(it->is_string(), what, ": weight_map['", it.key(), "'] must be a file name, got ",
                it->type_name());
    const std::string file = it->get<std::string>();
    MOE_REQUIRE(safe_relative(file), what, ": weight_map['", it.key(), "'] = '", file,
                "' is not a file inside the folder");
    out[it.key()] = file;
  }
  return out;
}

PretrainedFolder::PretrainedFolder(const std::string& dir) : dir_(dir) {
  struct stat st {};
  MOE_REQUIRE(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "pretrained folder '", dir,
              "': not a directory");
  const std::string cfg_path = dir + "/config.json";
  MOE_REQUIRE(is_regular_file(cfg_path), "pretrained folder '", dir, "': no config.json");
  config_ = parse_json_checked(read_text(cfg_path, kConfigJsonMaxBytes, config_what()),
                               config_what(), "the file");
  MOE_REQUIRE(config_.is_object(), config_what(), ": expected a JSON object, got ",
              config_.type_name());
  const std::string quantize_path = dir + "/quantize_config.json";
  if (is_regular_file(quantize_path)) {
    const std::string what = quantize_config_what();
    quantize_config_ =
        parse_json_checked(read_text(quantize_path, kConfigJsonMaxBytes, what), what, "the file");
    MOE_REQUIRE(quantize_config_.is_object(), what, ": expected a JSON object, got ",
                quantize_config_.type_name());
  }

  const std::string index_path = dir + "/model.safetensors.index.json";
  if (is_regular_file(index_path)) {
    index_name_ = "model.safetensors.index.json";
    const std::string what = cat("index '", index_path, "'");
    where_ = parse_index_json(read_text(index_path, kIndexJsonMaxBytes, what), what);
    for (const auto& [name, file] : where_)
      if (std::find(files_.begin(), files_.end(), file) == files_.end()) files_.push_back(file);
    std::sort(files_.begin(), files_.end());
    return;
  }
  // Unsharded: every *.safetensors of the folder, names from their headers.
  DIR* d = ::opendir(dir.c_str());
  MOE_REQUIRE(d != nullptr, "pretrained folder '", dir, "': cannot list (", std::strerror(errno),
              ")");
  for (dirent* e = ::readdir(d); e != nullptr; e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0 &&
        is_regular_file(dir + "/" + n))
      files_.push_back(n);
  }
  ::closedir(d);
  std::sort(files_.begin(), files_.end());
  MOE_REQUIRE(!files_.empty(), "pretrained folder '", dir,
              "': no *.safetensors file and no model.safetensors.index.json");
  for (const std::string& f : files_)
    for (const StEntry& e : view(f).header().entries) {
      auto [it, fresh] = where_.emplace(e.name, f);
      MOE_REQUIRE(fresh, "pretrained folder '", dir, "': tensor '", e.name, "' is in both '",
                  it->second, "' and '", f, "'");
    }
}

PretrainedFolder::~PretrainedFolder() = default;

std::string PretrainedFolder::config_what() const {
  return cat("config.json of '", dir_, "'");
}

std::string PretrainedFolder::quantize_config_what() const {
  return cat("quantize_config.json of '", dir_, "'");
}

const SafetensorsView& PretrainedFolder::view(const std::string& file) const {
  auto it = views_.find(file);
  if (it != views_.end()) return *it->second;
  const std::string path = dir_ + "/" + file;
  if (!is_regular_file(path)) {
    if (!index_name_.empty())
      throw Error(cat("index '", dir_, "/", index_name_, "' names the file '", file,
                      "', which does not exist in the folder"));
    throw Error(cat("safetensors file '", path, "': does not exist"));
  }
  auto v = std::make_unique<SafetensorsView>(path);
  return *views_.emplace(file, std::move(v)).first->second;
}

PretrainedFolder::Ref PretrainedFolder::get(const std::string& name) const {
  auto it = where_.find(name);
  MOE_REQUIRE(it != where_.end(), "pretrained folder '", dir_, "': tensor '", name,
              "' not found", index_name_.empty() ? " in its safetensors files" : " in the index");
  const SafetensorsView& v = view(it->second);
  const StEntry* e = v.find(name);
  MOE_REQUIRE(e != nullptr, "safetensors file '", v.path(), "': tensor '", name,
              "' is missing (the index places it in this file)");
  return {&v, e};
}

// ---- decoding --------------------------------------------------------------------------------

float fp8_e4m3_to_float(uint8_t v) {
  const int sign = v >> 7, exp = (v >> 3) & 0xf, mant = v & 0x7;
  float r;
  if (exp == 0xf && mant == 0x7)
    r = std::nanf("");  // e4m3fn has NaN only, no infinities
  else if (exp == 0)
    r = std::ldexp(static_cast<float>(mant), -9);  // subnormal: mant/8 · 2^-6
  else
    r = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
  return sign ? -r : r;
}

float fp4_e2m1_to_float(uint8_t nibble) {
  static constexpr float kValues[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float r = kValues[nibble & 7];
  return (nibble & 8) ? -r : r;
}

namespace {

void decode_plain(float* out, const uint8_t* p, int64_t n, const std::string& dtype) {
  if (dtype == "F32") {
    std::memcpy(out, p, static_cast<size_t>(n) * 4);
  } else if (dtype == "BF16") {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
    }
  } else if (dtype == "F16") {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = f16_to_float(h);
    }
  } else {
    MOE_ASSERT(dtype == "F64");
    for (int64_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, p + 8 * i, 8);
      out[i] = static_cast<float>(v);
    }
  }
}

bool plain_dtype(const std::string& d) {
  return d == "F32" || d == "BF16" || d == "F16" || d == "F64";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string where(const PretrainedFolder::Ref& r) {
  return cat("safetensors file '", r.view->path(), "': tensor '", r.entry->name, "'");
}

void require_shape(const PretrainedFolder::Ref& r, const std::vector<int64_t>& want,
                   const char* role = "") {
  MOE_REQUIRE(r.entry->shape == want, where(r), ": expected shape ", moe::shape_str(want), role,
              ", got ", moe::shape_str(r.entry->shape));
}

}  // namespace

bool StoredQuant::excluded(const std::string& module, std::string* why) const {
  // transformers' should_convert_module: re.match(key + boundary, name) — some prefix of the
  // name matched whole, ending on a "." or followed by one or by the end — or a suffix.
  std::vector<size_t> ends{module.size()};
  for (size_t i = 0; i < module.size(); ++i)
    if (module[i] == '.') ends.insert(ends.end(), {i, i + 1});
  for (const Pattern& p : not_converted) {
    bool hit = module.size() >= p.key.size() &&
               module.compare(module.size() - p.key.size(), p.key.size(), p.key) == 0;
    for (size_t n : ends)
      hit = hit || std::regex_match(module.begin(), module.begin() + static_cast<std::ptrdiff_t>(n), p.re);
    if (hit) {
      if (why) *why = cat(key("modules_to_not_convert"), " lists '", p.key, "'");
      return true;
    }
  }
  for (const Rule& r : dynamic)
    if (r.skip && std::regex_search(module, r.re, std::regex_constants::match_continuous)) {
      if (why) *why = cat(key("dynamic"), "['", r.key, "'] skips it");
      return true;
    }
  return false;
}

int64_t StoredQuant::group_of(const std::string& module) const {
  for (const Rule& r : dynamic)
    if (!r.skip && r.group != 0 &&
        std::regex_search(module, r.re, std::regex_constants::match_continuous))
      return r.group;
  return group;
}

Precision stored_precision(StoredWeight::Format f) {
  switch (f) {
    case StoredWeight::Format::fp8_block: return Precision::fp8;
    case StoredWeight::Format::mxfp4: return Precision::mxfp4;
    case StoredWeight::Format::gptq:
    case StoredWeight::Format::awq: return Precision::int4;
    default: return Precision::bf16;
  }
}

namespace {

int32_t load_i32(const uint8_t* p, int64_t i) {
  int32_t v;
  std::memcpy(&v, p + 4 * i, 4);
  return v;
}
uint16_t load_u16(const uint8_t* p, int64_t i) {
  uint16_t v;
  std::memcpy(&v, p + 2 * i, 2);
  return v;
}

// GPTQ / AWQ: "<module>.qweight" (I32), ".qzeros" (I32), ".scales" (F16), ".g_idx" (I32,
// GPTQ, optional), ".bias" (refused unless all zero: these families' experts have none).
StoredWeight open_int4(const PretrainedFolder& f, const std::string& name,
                       const std::string& module, const std::vector<int64_t>& shape,
                       const StoredQuant& q) {
  StoredWeight w;
  w.name = name;
  w.rows = shape[0];
  w.cols = shape[1];
  const std::string qw = module + ".qweight";
  MOE_REQUIRE(q.int4(), "pretrained folder '", f.dir(), "': tensor '", qw,
              "' is a GPTQ/AWQ tensor, but ", q.from_quantize_file ? "" : "config.json's ",
              q.key("quant_method"), " is '", q.method_name, "' (expected gptq or awq)");
  std::string why;
  MOE_REQUIRE(!q.excluded(module, &why), "pretrained folder '", f.dir(), "': tensor '", qw,
              "' is quantized, but ", why, " (expected '", name, "')");
  const bool gptq = q.method == StoredQuant::Method::gptq;
  w.format = gptq ? StoredWeight::Format::gptq : StoredWeight::Format::awq;
  w.dtype = gptq ? "GPTQ-INT4" : "AWQ-INT4";
  w.group = q.group_of(module);
  w.zeros_minus_one = q.zeros_minus_one;
  const auto need = [&](const std::string& suffix) {
    MOE_REQUIRE(f.has(module + suffix), "pretrained folder '", f.dir(), "': tensor '", qw,
                "' has no '", module, suffix, "' beside it (", gptq ? "GPTQ" : "AWQ",
                " stores qweight, qzeros and scales)");
    return f.get(module + suffix);
  };
  w.w = f.get(qw);
  w.zeros = need(".qzeros");
  w.scale = need(".scales");
  w.file = w.w.view->path();
  const auto dtype = [](const PretrainedFolder::Ref& r, const char* want, const char* what) {
    MOE_REQUIRE(r.entry->dtype == want, where(r), ": ", what, " must be ", want, ", got ",
                r.entry->dtype);
  };
  dtype(w.w, "I32", "packed int4 codes");
  dtype(w.zeros, "I32", "packed int4 zero points");
  dtype(w.scale, "F16", "scales");
  const int64_t K = w.cols, N = w.rows;
  const int64_t g = w.group == -1 ? K : w.group;
  const int64_t G = ceil_div(K, g);
  MOE_REQUIRE(N % 8 == 0, where(w.w), ": out_features ", N,
              " must be a multiple of 8 (qzeros packs 8 columns a word)");
  if (gptq) {
    MOE_REQUIRE(K % 8 == 0, where(w.w), ": in_features ", K,
                " must be a multiple of 8 (GPTQ's qweight packs 8 rows a word)");
    require_shape(w.w, {K / 8, N}, " (GPTQ qweight: in_features / 8, out_features)");
  } else {
    require_shape(w.w, {K, N / 8}, " (AWQ qweight: in_features, out_features / 8)");
  }
  require_shape(w.zeros, {G, N / 8}, cat(" (groups of ", g, ", out_features / 8)").c_str());
  require_shape(w.scale, {G, N}, cat(" (groups of ", g, ", out_features)").c_str());
  if (gptq && f.has(module + ".g_idx")) {
    w.g_idx = f.get(module + ".g_idx");
    dtype(w.g_idx, "I32", "g_idx");
    require_shape(w.g_idx, {K}, " (in_features)");
    // Read, not mapped: a fault here would map the cached folio around it (codes of other
    // matrices) long before the load hands those pages back.
    std::vector<int32_t> gi(static_cast<size_t>(K));
    w.g_idx.view->read(*w.g_idx.entry, 0, static_cast<uint64_t>(K) * 4, gi.data());
    for (int64_t k = 0; k < K; ++k) {
      const int32_t v = gi[static_cast<size_t>(k)];
      MOE_REQUIRE(v >= 0 && v < G, where(w.g_idx), ": g_idx[", k, "] = ", v,
                  " is outside the ", G, " groups of the scales");
    }
  }
  MOE_REQUIRE(!gptq || !q.desc_act || w.g_idx.entry, "pretrained folder '", f.dir(),
              "': tensor '", qw, "' has no '", module,
              ".g_idx' beside it, which ", q.key("desc_act"), " = true needs");
  if (f.has(module + ".bias")) {
    const PretrainedFolder::Ref b = f.get(module + ".bias");
    MOE_REQUIRE(plain_dtype(b.entry->dtype) && b.entry->shape == std::vector<int64_t>{N},
                where(b), ": expected a bias of shape [", N, "] (F16, BF16, F32)");
    std::vector<uint8_t> raw(static_cast<size_t>(b.entry->end - b.entry->begin));
    b.view->read(*b.entry, 0, raw.size(), raw.data());
    std::vector<float> v(static_cast<size_t>(N));
    decode_plain(v.data(), raw.data(), N, b.entry->dtype);
    MOE_REQUIRE(std::all_of(v.begin(), v.end(), [](float x) { return x == 0.0f; }), where(b),
                ": a non-zero bias, which this family's experts do not have");
  }
  return w;
}

}  // namespace

StoredWeight open_weight(const PretrainedFolder& f, const std::string& name,
                         const std::vector<int64_t>& shape, const StoredQuant& q) {
  const int64_t fp8_block[2] = {q.fp8_block[0], q.fp8_block[1]};
  constexpr const char* kWeight = ".weight";
  if (shape.size() == 2 && !f.has(name) && name.size() > 7 &&
      name.compare(name.size() - 7, 7, kWeight) == 0) {
    const std::string module = name.substr(0, name.size() - 7);
    if (f.has(module + ".qweight")) return open_int4(f, name, module, shape, q);
  }
  MOE_ASSERT(shape.size() >= 1 && shape.size() <= 3);
  StoredWeight w;
  w.name = name;
  w.stack = shape.size() == 3 ? shape[0] : 0;
  w.rows = shape.size() == 1 ? 1 : shape[shape.size() - 2];  // a vector is one row
  w.cols = shape.back();
  std::vector<int64_t> lead;
  if (w.stack) lead.push_back(w.stack);

  if (!f.has(name) && f.has(name + "_blocks")) {  // MXFP4: e2m1 pairs + e8m0 exponents
    w.format = StoredWeight::Format::mxfp4;
    w.dtype = "MXFP4";
    w.w = f.get(name + "_blocks");
    MOE_REQUIRE(f.has(name + "_scales"), "pretrained folder '", f.dir(), "': tensor '", name,
                "_blocks' has no '", name, "_scales' beside it");
    w.scale = f.get(name + "_scales");
    MOE_REQUIRE(w.w.entry->dtype == "U8", where(w.w), ": MXFP4 blocks must be U8, got ",
                w.w.entry->dtype);
    MOE_REQUIRE(w.scale.entry->dtype == "U8", where(w.scale), ": MXFP4 scales must be U8, got ",
                w.scale.entry->dtype);
    MOE_REQUIRE(w.cols % 32 == 0, where(w.w), ": MXFP4 needs a multiple of 32 columns, the ",
                "layer needs ", w.cols);
    std::vector<int64_t> b = lead, s = lead;
    b.insert(b.end(), {w.rows, w.cols / 32, 16});
    s.insert(s.end(), {w.rows, w.cols / 32});
    require_shape(w.w, b, " (MXFP4 blocks of 32 values)");
    require_shape(w.scale, s, " (MXFP4 scales)");
    w.file = w.w.view->path();
    return w;
  }
  w.w = f.get(name);
  w.file = w.w.view->path();
  w.dtype = w.w.entry->dtype;
  require_shape(w.w, shape);
  if (plain_dtype(w.dtype)) return w;
  MOE_REQUIRE(w.dtype == "F8_E4M3", where(w.w), ": dtype ", w.dtype,
              " is not a weight format libmoe reads (F32, F64, F16, BF16, F8_E4M3 with block "
              "scales '", name, "_scale_inv', MXFP4 '", name, "_blocks'/'", name, "_scales')");
  w.format = StoredWeight::Format::fp8_block;
  MOE_REQUIRE(f.has(name + "_scale_inv"), where(w.w), ": F8_E4M3 weight without its block scales '",
              name, "_scale_inv'");
  w.scale = f.get(name + "_scale_inv");
  MOE_REQUIRE(plain_dtype(w.scale.entry->dtype), where(w.scale),
              ": block scales must be F32, BF16, F16 or F64, got ", w.scale.entry->dtype);
  w.block_rows = fp8_block[0];
  w.block_cols = fp8_block[1];
  std::vector<int64_t> s = lead;
  s.insert(s.end(), {ceil_div(w.rows, w.block_rows), ceil_div(w.cols, w.block_cols)});
  require_shape(w.scale, s, cat(" (blocks of ", w.block_rows, "x", w.block_cols, ")").c_str());
  return w;
}

void StoredWeight::row(float* out, int64_t e, int64_t r) const {
  const int64_t idx = e * rows + r;  // row of the flattened (stack·rows, ·) data
  switch (format) {
    case Format::plain: {
      const size_t item = safetensors_dtype_size(dtype);
      decode_plain(out, w.view->data(*w.entry) + static_cast<size_t>(idx * cols) * item, cols,
                   dtype);
      break;
    }
    case Format::fp8_block: {
      const uint8_t* p = w.view->data(*w.entry) + idx * cols;
      const int64_t nb = ceil_div(cols, block_cols);
      const int64_t srow = e * ceil_div(rows, block_rows) + r / block_rows;
      float scales[1024];
      std::vector<float> big;
      float* s = scales;
      if (nb > 1024) {
        big.resize(static_cast<size_t>(nb));
        s = big.data();
      }
      const size_t item = safetensors_dtype_size(scale.entry->dtype);
      decode_plain(s, scale.view->data(*scale.entry) + static_cast<size_t>(srow * nb) * item, nb,
                   scale.entry->dtype);
      for (int64_t c = 0; c < cols; ++c) out[c] = fp8_e4m3_to_float(p[c]) * s[c / block_cols];
      break;
    }
    case Format::mxfp4: {
      const int64_t G = cols / 32;
      const uint8_t* b = w.view->data(*w.entry) + idx * G * 16;
      const uint8_t* s = scale.view->data(*scale.entry) + idx * G;
      for (int64_t g = 0; g < G; ++g) {
        const float m = std::ldexp(1.0f, static_cast<int>(s[g]) - 127);
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t byte = b[g * 16 + j];
          out[g * 32 + 2 * j] = fp4_e2m1_to_float(byte & 0xf) * m;  // low nibble first
          out[g * 32 + 2 * j + 1] = fp4_e2m1_to_float(byte >> 4) * m;
        }
      }
      break;
    }
    case Format::gptq:
    case Format::awq: {
      // Row r of the stored (out, in) matrix: output j = r over every input k.
      const int64_t K = cols, N = rows, j = r;
      const int64_t g = group == -1 ? K : group;
      const uint8_t* qw = w.view->data(*w.entry);
      const uint8_t* qz = zeros.view->data(*zeros.entry);
      const uint8_t* sc = scale.view->data(*scale.entry);
      const uint8_t* gi = g_idx.entry ? g_idx.view->data(*g_idx.entry) : nullptr;
      const auto nib = [](int32_t word, int pos) {
        return static_cast<int>((static_cast<uint32_t>(word) >> (4 * pos)) & 15u);
      };
      const bool gptq = format == Format::gptq;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t grp = gi ? load_i32(gi, k) : k / g;
        int q, z;
        if (gptq) {
          q = nib(load_i32(qw, (k / 8) * N + j), static_cast<int>(k % 8));
          z = nib(load_i32(qz, grp * (N / 8) + j / 8), static_cast<int>(j % 8));
          if (zeros_minus_one) z = (z + 1) & 15;
        } else {
          q = nib(load_i32(qw, k * (N / 8) + j / 8), kAwqNibbleOf[j % 8]);
          z = nib(load_i32(qz, grp * (N / 8) + j / 8), kAwqNibbleOf[j % 8]);
        }
        out[k] = static_cast<float>(q - z) * f16_to_float(load_u16(sc, grp * N + j));
      }
      break;
    }
  }
}

// Bytes [offset, offset + n) of matrix e's data in the file (the scales are small and left to
// the page faults).
static void matrix_range(const StoredWeight& w, int64_t e, uint64_t& offset, uint64_t& n) {
  switch (w.format) {
    case StoredWeight::Format::plain:
      n = static_cast<uint64_t>(w.rows * w.cols) * safetensors_dtype_size(w.dtype);
      break;
    case StoredWeight::Format::fp8_block:
      n = static_cast<uint64_t>(w.rows * w.cols);
      break;
    case StoredWeight::Format::mxfp4:
      n = static_cast<uint64_t>(w.rows * w.cols / 2);
      break;
    case StoredWeight::Format::gptq:
    case StoredWeight::Format::awq:
      n = w.w.entry->end - w.w.entry->begin;
      break;
  }
  offset = static_cast<uint64_t>(e) * n;
}

void StoredWeight::release(int64_t e) const {
  uint64_t offset = 0, n = 0;
  matrix_range(*this, e, offset, n);
  if (format == Format::plain) {
    w.view->release(*w.entry, offset, n);
    return;
  }
  // Low-bit formats read small companion tensors (scales, zero points, g_idx) beside the
  // codes, and a fault maps the whole cached folio around it (up to 2 MiB on Linux 6.18: the
  // kernel's fault-around maps entire large folios), codes of matrices already handed back
  // among them: the release reaches that far on both sides, and covers the companions too.
  // Without it, GPTQ's qzeros (stored between the qweights) kept 0.45x a block's bytes mapped
  // until the folder closed; a page of another thread's matrix dropped too is only faulted in
  // again from the page cache.
  constexpr uint64_t kFaultAround = 2 << 20;
  w.view->release(*w.entry, offset, n, kFaultAround);
  const auto whole = [&](const PretrainedFolder::Ref& r) {
    if (r.entry) r.view->release(*r.entry, 0, r.entry->end - r.entry->begin, kFaultAround);
  };
  switch (format) {
    case Format::fp8_block: {
      const uint64_t per = static_cast<uint64_t>(ceil_div(rows, block_rows) *
                                                 ceil_div(cols, block_cols)) *
                           safetensors_dtype_size(scale.entry->dtype);
      scale.view->release(*scale.entry, static_cast<uint64_t>(e) * per, per, kFaultAround);
      break;
    }
    case Format::mxfp4: {
      const uint64_t per = static_cast<uint64_t>(rows * (cols / 32));
      scale.view->release(*scale.entry, static_cast<uint64_t>(e) * per, per, kFaultAround);
      break;
    }
    default:
      whole(zeros);
      whole(scale);
      whole(g_idx);
      break;
  }
}

void StoredWeight::read_bytes(int64_t e, void* dst) const {
  MOE_ASSERT(format == Format::plain);
  uint64_t offset = 0, n = 0;
  matrix_range(*this, e, offset, n);
  w.view->read(*w.entry, offset, n, dst);
}

uint64_t StoredWeight::file_offset(int64_t e) const {
  uint64_t offset = 0, n = 0;
  matrix_range(*this, e, offset, n);
  return w.view->header().data_start + w.entry->begin + offset;
}

void StoredWeight::prefetch(int64_t e) const {
  uint64_t offset = 0, n = 0;
  matrix_range(*this, e, offset, n);
  w.view->prefetch(*w.entry, offset, n);
}

int64_t StoredWeight::file_bytes() const {
  int64_t n = static_cast<int64_t>(w.entry->end - w.entry->begin);
  for (const PretrainedFolder::Ref* r : {&scale, &zeros, &g_idx})
    if (r->entry) n += static_cast<int64_t>(r->entry->end - r->entry->begin);
  return n;
}

// Matrices smaller than this are read by one thread: a parallel region per small matrix
// costs more than it gives (and on a busy machine, much more).
constexpr int64_t kParallelRead = int64_t{1} << 22;

void read_matrix(float* dst, const StoredWeight& w, int64_t e, const MatrixMap& m) {
  const int64_t In = m.In, Out = m.Out, C = w.cols;
  MOE_ASSERT(e >= 0 && (w.stack == 0 ? e == 0 : e < w.stack));
  if (m.out_major) {
    MOE_ASSERT(m.out_base + m.out_step * (Out - 1) < w.rows && m.in_base + In <= C);
    constexpr int64_t kBlock = 32;  // outputs decoded together, then written transposed
    const int64_t nb = (Out + kBlock - 1) / kBlock;
    // Rows of the scratch 16 floats apart from a multiple of 4 KiB: the transposing reads walk
    // down a column, and a power-of-two stride would put all 32 in one L1 set.
    const int64_t ld = C + 16;
#pragma omp parallel if (In * Out >= kParallelRead)
    {
      std::vector<float> tmp(static_cast<size_t>(kBlock * ld));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t o0 = b * kBlock, o1 = std::min(Out, o0 + kBlock);
        for (int64_t o = o0; o < o1; ++o)
          w.row(tmp.data() + (o - o0) * ld, e, m.out_base + m.out_step * o);
        for (int64_t i = 0; i < In; ++i) {
          float* d = dst + i * Out;
          const float* src = tmp.data() + m.in_base + i;
          for (int64_t o = o0; o < o1; ++o) d[o] = src[(o - o0) * ld];
        }
      }
    }
  } else {
    MOE_ASSERT(m.in_base + In <= w.rows && m.out_base + m.out_step * (Out - 1) < C);
#pragma omp parallel if (In * Out >= kParallelRead)
    {
      std::vector<float> tmp(static_cast<size_t>(C));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < In; ++i) {
        w.row(tmp.data(), e, m.in_base + i);
        float* d = dst + i * Out;
        for (int64_t o = 0; o < Out; ++o) d[o] = tmp[m.out_base + m.out_step * o];
      }
    }
  }
}

bool keeps_stored(const StoredWeight& w, const MatrixMap& m, Precision precision) {
  if (precision != stored_precision(w.format) || w.format == StoredWeight::Format::plain)
    return false;
  const bool whole_rows = m.out_major && m.in_base == 0 && m.In == w.cols;
  switch (w.format) {
    case StoredWeight::Format::fp8_block:
      // The layer's fp8 has 128 x 128 blocks: the stored ones must be those, and the matrix
      // must start on a block row (a stacked gate_up split at F).
      return whole_rows && w.block_rows == 128 && w.block_cols == 128 && m.out_step == 1 &&
             m.out_base % 128 == 0;
    case StoredWeight::Format::mxfp4:
      return whole_rows;
    default: {  // GPTQ / AWQ: the kernel's groups (the repacking's rule)
      const int64_t g = w.group;
      const bool kernel_group = g == 32 || g == 64 || (g > 0 && g % 128 == 0) ||
                                (g == -1 && w.format == StoredWeight::Format::gptq);
      return whole_rows && m.out_base == 0 && m.out_step == 1 && m.Out == w.rows && kernel_group;
    }
  }
}

namespace {

// p as an array of T: in place when aligned, else copied into `copy` (int32 words).
template <typename T>
const T* aligned_as(const uint8_t* p, size_t bytes, std::vector<int32_t>& copy) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) == 0) return reinterpret_cast<const T*>(p);
  copy.resize((bytes + 3) / 4);
  std::memcpy(copy.data(), p, bytes);
  return reinterpret_cast<const T*>(copy.data());
}

}  // namespace

void stored_view(const StoredWeight& w, int64_t e, const MatrixMap& m, StoredView& out) {
  MOE_ASSERT(m.out_major && m.in_base == 0 && m.In == w.cols);
  MOE_ASSERT(e >= 0 && (w.stack == 0 ? e == 0 : e < w.stack));
  const int64_t row0 = e * w.rows + m.out_base;  // first stored row of the matrix
  switch (w.format) {
    case StoredWeight::Format::fp8_block: {
      const int64_t nbr = ceil_div(w.rows, 128), nbc = ceil_div(w.cols, 128);
      const int64_t srow = e * nbr + m.out_base / 128, sn = ceil_div(m.Out, 128) * nbc;
      const uint8_t* sp = w.scale.view->data(*w.scale.entry);
      const std::string& sdt = w.scale.entry->dtype;
      const float* s = nullptr;
      if (sdt == "F32" && reinterpret_cast<uintptr_t>(sp) % alignof(float) == 0) {
        s = reinterpret_cast<const float*>(sp) + srow * nbc;
      } else {  // a few scales: widened (or aligned) into out.scales
        out.scales.resize(static_cast<size_t>(sn));
        decode_plain(out.scales.data(), sp + srow * nbc * safetensors_dtype_size(sdt), sn, sdt);
        s = out.scales.data();
      }
      for (int64_t i = 0; i < sn; ++i)
        MOE_REQUIRE(std::isfinite(s[i]), where(w.scale), ": a non-finite block scale (block ",
                    srow + i / nbc, ", ", i % nbc, ")");
      out.view = Fp8Kernel::view(w.w.view->data(*w.w.entry) + row0 * w.cols, w.cols, s, m.In,
                                 m.Out);
      return;
    }
    case StoredWeight::Format::mxfp4: {
      const int64_t G = w.cols / 32;
      out.view = Mxfp4Kernel::view(w.w.view->data(*w.w.entry) + row0 * G * 16,
                                   w.scale.view->data(*w.scale.entry) + row0 * G, m.In, m.Out);
      out.view.code_stride *= m.out_step;  // GPT-OSS's gate / up rows interleave
      out.view.scale_stride *= m.out_step;
      return;
    }
    case StoredWeight::Format::gptq:
    case StoredWeight::Format::awq: {
      std::vector<int32_t> c_qw, c_qz, c_sc, c_gi;
      const auto bytes = [](const PretrainedFolder::Ref& r) {
        return static_cast<size_t>(r.entry->end - r.entry->begin);
      };
      const int32_t* qw = aligned_as<int32_t>(w.w.view->data(*w.w.entry), bytes(w.w), c_qw);
      const int32_t* qz =
          aligned_as<int32_t>(w.zeros.view->data(*w.zeros.entry), bytes(w.zeros), c_qz);
      const uint16_t* sc =
          aligned_as<uint16_t>(w.scale.view->data(*w.scale.entry), bytes(w.scale), c_sc);
      try {
        if (w.format == StoredWeight::Format::gptq) {
          GptqInt4 t;
          t.K = w.cols;
          t.N = w.rows;
          t.group = w.group;
          t.qweight = qw;
          t.qzeros = qz;
          t.scales = sc;
          t.g_idx = w.g_idx.entry ? aligned_as<int32_t>(w.g_idx.view->data(*w.g_idx.entry),
                                                        bytes(w.g_idx), c_gi)
                                  : nullptr;
          t.zeros_minus_one = w.zeros_minus_one;
          out.int4 = int4_from_gptq(t);
        } else {
          AwqInt4 t;
          t.K = w.cols;
          t.N = w.rows;
          t.group = w.group;
          t.qweight = qw;
          t.qzeros = qz;
          t.scales = sc;
          out.int4 = int4_from_awq(t);
        }
      } catch (const Error& err) {
        const bool gidx = w.g_idx.entry && std::string(err.what()).find("g_idx") != std::string::npos;
        throw Error(cat(where(gidx ? w.g_idx : w.w), ": ", err.what()));
      }
      out.view = out.int4.view();
      return;
    }
    default:
      MOE_ASSERT(false);
  }
}

}  // namespace moe::detail
