// safetensors reader and writer (format and checks: docs/checkpoints.md).
//
// The loader treats every byte as hostile: sizes are checked against the file before any
// allocation, the JSON is depth-limited before it is parsed, and all arithmetic on offsets and
// element counts is overflow-checked. Anything wrong becomes a moe::Error naming the file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/check.hpp"
#include "io/io_util.hpp"
#include "io/safetensors_header.hpp"
#include "moe/checkpoint.hpp"

namespace moe {

static_assert(std::endian::native == std::endian::little,
              "the safetensors code assumes a little-endian host");

using detail::cat;
using ojson = nlohmann::ordered_json;

namespace detail {

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // ±0
  } else {
    // Subnormal half: shift the mantissa up until its leading 1 is the implicit bit.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

}  // namespace detail

namespace {

using detail::f16_to_float;

constexpr const char* kMetadataKey = "__metadata__";

// ---- dtypes ---------------------------------------------------------------------------------

struct DType {
  const char* name;
  size_t itemsize;
  bool float_readable;  // load_safetensors converts it to float32
};
// F32 is what libmoe writes; F64, F16 and BF16 are read and widened/narrowed to float32. The
// other dtypes of the format are known by size only: the header reader of pretrained folders
// (safetensors_header.hpp) accepts them, and the loader of src/io/pretrained*.cpp decodes the
// ones it needs (F8_E4M3, U8).
constexpr DType kDTypes[] = {
    {"F32", 4, true},      {"F64", 8, true},      {"F16", 2, true},     {"BF16", 2, true},
    {"F8_E4M3", 1, false}, {"F8_E5M2", 1, false}, {"F8_E8M0", 1, false}, {"U8", 1, true},
    {"I8", 1, true},       {"BOOL", 1, false},    {"I16", 2, false},    {"U16", 2, false},
    {"I32", 4, false},     {"U32", 4, false},     {"I64", 8, false},    {"U64", 8, false}};

const DType* find_dtype(const std::string& s, bool any_dtype) {
  for (const DType& d : kDTypes)
    if (s == d.name && (any_dtype || d.float_readable)) return &d;
  return nullptr;
}

void convert_to_f32(float* dst, const uint8_t* src, size_t n, const std::string& dtype) {
  if (dtype == "F32") {
    std::memcpy(dst, src, n * 4);
  } else if (dtype == "F64") {
    for (size_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, src + 8 * i, 8);
      dst[i] = static_cast<float>(v);
    }
  } else if (dtype == "F16") {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = f16_to_float(h);
    }
  } else if (dtype == "I8") {
    for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<int8_t>(src[i]));
  } else if (dtype == "U8") {
    for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    MOE_ASSERT(dtype == "BF16");
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
    }
  }
}

// ---- header checks --------------------------------------------------------------------------

// Nesting depth of JSON text, counting only brackets outside strings. Runs before the parser
// so that "[[[[…" ten thousand deep is refused without building anything.
bool json_depth_within(const std::string& s, int limit, size_t* where) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) {
        *where = i;
        return false;
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}


// A JSON number that is a whole number in 0..INT64_MAX.
bool as_index(const ojson& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
  } else if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
  } else {
    return false;
  }
  return *out <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

using Entry = detail::StEntry;

Entry check_entry(const std::string& name, const ojson& j, uint64_t data_size,
                  const std::string& what, bool any_dtype) {
  const std::string where = cat(what, ": tensor '", name, "'");
  if (!j.is_object()) throw Error(cat(where, ": entry must be a JSON object, got ", j.type_name()));
  Entry e;
  e.name = name;

  const auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string()) throw Error(cat(where, ": missing string field 'dtype'"));
  e.dtype = dt->get<std::string>();
  const DType* dtype = find_dtype(e.dtype, any_dtype);
  if (!dtype)
    throw Error(cat(where, any_dtype ? ": unknown dtype '" : ": unsupported dtype '", e.dtype,
                    any_dtype ? "' (not a dtype of the safetensors format)"
                              : "' (libmoe reads F32, F64, F16, BF16, I8 and U8)"));

  const auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) throw Error(cat(where, ": missing array field 'shape'"));
  e.numel = 1;
  for (const ojson& d : *sh) {
    uint64_t v = 0;
    if (!as_index(d, &v))
      throw Error(cat(where, ": shape ", sh->dump(), " has an entry that is not a whole number >= 0"));
    e.shape.push_back(static_cast<int64_t>(v));
    uint64_t prod = 0;
    if (__builtin_mul_overflow(e.numel, v, &prod) ||
        prod > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw Error(cat(where, ": shape ", sh->dump(), " has more elements than fit in 64 bits"));
    e.numel = prod;
  }

  const auto off = j.find("data_offsets");
  if (off == j.end() || !off->is_array() || off->size() != 2 || !as_index((*off)[0], &e.begin) ||
      !as_index((*off)[1], &e.end))
    throw Error(cat(where, ": 'data_offsets' must be two whole numbers [begin, end], got ",
                    off == j.end() ? std::string("nothing") : off->dump()));
  if (e.end < e.begin)
    throw Error(cat(where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin"));
  if (e.end > data_size)
    throw Error(cat(where, ": data_offsets [", e.begin, ", ", e.end,
                    "] run past the end of the data section (", data_size, " bytes)"));
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(e.numel, static_cast<uint64_t>(dtype->itemsize), &bytes) ||
      bytes != e.end - e.begin)
    throw Error(cat(where, ": data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin,
                    " bytes but shape ", shape_str(e.shape), " of ", e.dtype, " needs ",
                    e.numel, " x ", dtype->itemsize));
  return e;
}

// Where the bytes come from: a file (pread) or memory. Offsets are checked by the caller.
struct ByteSource {
  virtual ~ByteSource() = default;
  virtual uint64_t size() const = 0;
  virtual void read(uint64_t offset, size_t n, void* dst) const = 0;
};

struct MemorySource final : ByteSource {
  const uint8_t* p;
  size_t n;
  MemorySource(const uint8_t* p_, size_t n_) : p(p_), n(n_) {}
  uint64_t size() const override { return n; }
  void read(uint64_t offset, size_t count, void* dst) const override {
    MOE_ASSERT(offset <= n && count <= n - offset);
    if (count) std::memcpy(dst, p + offset, count);
  }
};

struct FileSource final : ByteSource {
  int fd = -1;
  uint64_t bytes = 0;
  std::string what;
  explicit FileSource(const std::string& path) : what(cat("safetensors file '", path, "'")) {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(cat(what, ": cannot open (", std::strerror(errno), ")"));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw Error(cat(what, ": not a regular file"));
    }
    bytes = static_cast<uint64_t>(st.st_size);
  }
  ~FileSource() override {
    if (fd >= 0) ::close(fd);
  }
  FileSource(const FileSource&) = delete;
  FileSource& operator=(const FileSource&) = delete;
  uint64_t size() const override { return bytes; }
  void read(uint64_t offset, size_t count, void* dst) const override {
    auto* out = static_cast<uint8_t*>(dst);
    while (count > 0) {
      const ssize_t r = ::pread(fd, out, count, static_cast<off_t>(offset));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw Error(cat(what, ": read failed at byte ", offset, " (",
                        r == 0 ? "file shrank while reading" : std::strerror(errno), ")"));
      out += r;
      offset += static_cast<uint64_t>(r);
      count -= static_cast<size_t>(r);
    }
  }
};

detail::StHeader read_header(const ByteSource& src, const std::string& what, bool any_dtype) {
  const uint64_t size = src.size();
  if (size < 8)
    throw Error(cat(what, ": file is ", size, " bytes, too short for the 8-byte header length"));
  uint8_t len_bytes[8];
  src.read(0, 8, len_bytes);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kSafetensorsMaxHeaderBytes)
    throw Error(cat(what, ": header length ", n, " exceeds the limit of ",
                    kSafetensorsMaxHeaderBytes, " bytes"));
  if (n > size - 8)
    throw Error(cat(what, ": header length ", n, " runs past the end of the file (", size,
                    " bytes)"));
  std::string text(static_cast<size_t>(n), '\0');
  src.read(8, static_cast<size_t>(n), text.data());
  const uint64_t data_start = 8 + n;
  const uint64_t data_size = size - data_start;

  const ojson header = detail::parse_json_checked(text, what, "header");
  if (!header.is_object())
    throw Error(cat(what, ": header must be a JSON object, got ", header.type_name()));

  detail::StHeader out;
  out.data_start = data_start;
  out.data_size = data_size;
  std::vector<Entry>& entries = out.entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == kMetadataKey) {
      if (!it->is_object())
        throw Error(cat(what, ": '__metadata__' must be an object of strings, got ",
                        it->type_name()));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw Error(cat(what, ": '__metadata__' value of '", m.key(),
                          "' must be a string, got ", m->type_name()));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries.push_back(check_entry(it.key(), *it, data_size, what, any_dtype));
  }

  // Two tensors must not share bytes. Empty tensors occupy nothing and cannot overlap.
  std::vector<const Entry*> by_offset;
  for (const Entry& e : entries)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      throw Error(cat(what, ": tensors '", by_offset[i - 1]->name, "' [", by_offset[i - 1]->begin,
                      ", ", by_offset[i - 1]->end, ") and '", by_offset[i]->name, "' [",
                      by_offset[i]->begin, ", ", by_offset[i]->end, ") overlap"));
  return out;
}

SafetensorsFile parse_source(const ByteSource& src, const std::string& what) {
  const detail::StHeader h = read_header(src, what, /*any_dtype=*/false);
  const uint64_t data_start = h.data_start;
  const std::vector<Entry>& entries = h.entries;
  SafetensorsFile out;
  out.metadata = h.metadata;

  // Every size is now bounded by the file's, so allocation is safe.
  std::vector<uint8_t> raw;
  out.tensors.reserve(entries.size());
  for (const Entry& e : entries) {
    NamedTensor t;
    t.name = e.name;
    t.dtype = e.dtype;
    t.tensor.shape = e.shape;
    t.tensor.data.resize(static_cast<size_t>(e.numel));
    const size_t nbytes = static_cast<size_t>(e.end - e.begin);
    if (e.dtype == "F32") {
      src.read(data_start + e.begin, nbytes, t.tensor.data.data());
    } else {
      raw.resize(nbytes);
      src.read(data_start + e.begin, nbytes, raw.data());
      convert_to_f32(t.tensor.data.data(), raw.data(), static_cast<size_t>(e.numel), e.dtype);
    }
    out.tensors.push_back(std::move(t));
  }
  return out;
}

}  // namespace

const NamedTensor* SafetensorsFile::find(const std::string& name) const {
  for (const NamedTensor& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

SafetensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& what) {
  MOE_REQUIRE(bytes != nullptr || size == 0, "parse_safetensors: bytes is null");
  return parse_source(MemorySource(bytes, size), cat("safetensors data ", what));
}

namespace detail {

ojson parse_json_checked(const std::string& text, const std::string& what, const char* part) {
  size_t where = 0;
  if (!detail::utf8_valid(text, &where))
    throw Error(cat(what, ": ", part, " is not valid UTF-8 (byte ", where, " of the ", part, ")"));
  // nlohmann's lexer stops at a NUL byte as if the input ended there, which would accept
  // "{}" followed by garbage; raw NUL is never valid JSON, so refuse it here.
  if (const size_t nul = text.find('\0'); nul != std::string::npos)
    throw Error(cat(what, ": ", part, " is not valid JSON (a NUL byte at byte ", nul,
                    " of the ", part, ")"));
  if (!json_depth_within(text, kSafetensorsMaxJsonDepth, &where))
    throw Error(cat(what, ": ", part, " JSON is nested deeper than ", kSafetensorsMaxJsonDepth,
                    " levels (at byte ", where, " of the ", part, ")"));

  // Duplicate keys are legal JSON but ambiguous here (which tensor is meant?), and nlohmann
  // keeps one silently, so the callback tracks the keys of every open object.
  std::vector<std::set<std::string>> open_keys;
  std::string duplicate;
  auto cb = [&](int /*depth*/, ojson::parse_event_t ev, ojson& parsed) {
    switch (ev) {
      case ojson::parse_event_t::object_start:
      case ojson::parse_event_t::array_start:
        open_keys.emplace_back();
        break;
      case ojson::parse_event_t::object_end:
      case ojson::parse_event_t::array_end:
        if (!open_keys.empty()) open_keys.pop_back();
        break;
      case ojson::parse_event_t::key:
        if (!open_keys.empty() && parsed.is_string()) {
          const auto& k = parsed.get_ref<const std::string&>();
          if (!open_keys.back().insert(k).second) {
            duplicate = k;
            throw Error("");  // replaced below with a message naming the key
          }
        }
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return ojson::parse(text, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Error&) {
    throw Error(cat(what, ": ", part, " has the key '", duplicate, "' twice"));
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(what, ": ", part, " is not valid JSON (", e.what(), ")"));
  }
}

size_t safetensors_dtype_size(const std::string& dtype) {
  const DType* d = find_dtype(dtype, /*any_dtype=*/true);
  return d ? d->itemsize : 0;
}

StHeader parse_safetensors_header(const uint8_t* bytes, size_t size, const std::string& what) {
  MOE_REQUIRE(bytes != nullptr || size == 0, "parse_safetensors_header: bytes is null");
  return read_header(MemorySource(bytes, size), what, /*any_dtype=*/true);
}

}  // namespace detail

SafetensorsFile load_safetensors(const std::string& path) {
  FileSource src(path);
  return parse_source(src, src.what);
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                      const std::map<std::string, std::string>& metadata,
                      const std::set<std::string>& as_i8,
                      const std::set<std::string>& as_u8) {
  const std::string what = cat("save_safetensors('", path, "')");
  MOE_REQUIRE(!path.empty(), "save_safetensors: path is empty");

  // Everything is checked and the header built before the file system is touched.
  ojson header = ojson::object();
  if (!metadata.empty()) {
    ojson meta = ojson::object();
    for (const auto& [k, v] : metadata) {
      MOE_REQUIRE(detail::utf8_valid(k) && detail::utf8_valid(v), what,
                  ": metadata key or value is not valid UTF-8 (key '", k, "')");
      meta[k] = v;
    }
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MOE_REQUIRE(t != nullptr, what, ": tensor '", name, "' is null");
    MOE_REQUIRE(name != kMetadataKey, what, ": '__metadata__' is reserved, not a tensor name");
    MOE_REQUIRE(detail::utf8_valid(name), what, ": tensor name is not valid UTF-8");
    MOE_REQUIRE(seen.insert(name).second, what, ": tensor name '", name, "' given twice");
    uint64_t numel = 1;
    for (int64_t d : t->shape) {
      MOE_REQUIRE(d >= 0, what, ": tensor '", name, "' has a negative dimension in ",
                  shape_str(t->shape));
      MOE_REQUIRE(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel), what,
                  ": tensor '", name, "' shape ", shape_str(t->shape), " overflows");
    }
    MOE_REQUIRE(numel == t->data.size(), what, ": tensor '", name, "' has shape ",
                shape_str(t->shape), " (", numel, " elements) but holds ", t->data.size(),
                " values");
    const bool i8 = as_i8.count(name) > 0, u8 = as_u8.count(name) > 0;
    MOE_REQUIRE(!(i8 && u8), what, ": tensor '", name, "' is asked for as both I8 and U8");
    if (i8 || u8)
      for (size_t i = 0; i < t->data.size(); ++i) {
        const float v = t->data[i], lo = i8 ? -128.0f : 0.0f, hi = i8 ? 127.0f : 255.0f;
        MOE_REQUIRE(v >= lo && v <= hi && v == std::nearbyint(v), what, ": tensor '", name,
                    "' is written as ", i8 ? "I8" : "U8", " but holds ", v, " at index ", i);
      }
    const uint64_t bytes = numel * (i8 || u8 ? 1 : sizeof(float));
    header[name] = ojson{{"dtype", i8 ? "I8" : u8 ? "U8" : "F32"}, {"shape", t->shape},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  // 8 + N a multiple of 8 keeps the data section 8-byte aligned for readers that mmap it.
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(text.size() >> (8 * i));

  detail::AtomicFile f(path);
  f.write(len_bytes, 8);
  f.write(text.data(), text.size());
  std::vector<uint8_t> bytes;
  for (const auto& [name, t] : tensors) {
    const bool i8 = as_i8.count(name) > 0;
    if (!i8 && !as_u8.count(name)) {
      f.write(t->data.data(), t->data.size() * sizeof(float));
      continue;
    }
    bytes.resize(t->data.size());
    for (size_t i = 0; i < bytes.size(); ++i)
      bytes[i] = i8 ? static_cast<uint8_t>(static_cast<int8_t>(t->data[i]))
                    : static_cast<uint8_t>(t->data[i]);
    f.write(bytes.data(), bytes.size());
  }
  f.commit();
}

}  // namespace moe
