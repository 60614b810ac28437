#include "json_input.hpp"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <sstream>

namespace moe::cli {

namespace {

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw InputError(os.str());
}

const char* type_name(const json& v) {
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number_float()) return "a number";
  return v.type_name();
}

const json* find(const json& obj, const char* field) {
  auto it = obj.find(field);
  return it == obj.end() ? nullptr : &*it;
}

// An integer-valued JSON number: integers, and floats such as 2.0 that a Python
// json.dumps may write for one.
bool as_integer(const json& v, int64_t& out) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    out = v.get<int64_t>();
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15) return false;
    out = static_cast<int64_t>(d);
    return true;
  }
  return false;
}

float entry_float(const json& v, const char* field, int64_t r, int64_t c, bool flat) {
  auto where = [&] {
    std::ostringstream os;
    os << field;
    if (!flat) os << "[" << r << "]";
    os << "[" << c << "]";
    return os.str();
  };
  if (!v.is_number()) fail(where(), ": expected a number, got ", type_name(v));
  const double d = v.get<double>();
  const float f = static_cast<float>(d);
  if (!std::isfinite(d) || !std::isfinite(f))
    fail(where(), ": non-finite value (", d, " is outside float32 range)");
  return f;
}

// Walks the document again to find the path (X[0][1], or a key) of a number that overflows
// a double, which nlohmann::json reports without saying where.
class PathSax : public nlohmann::json_sax<json> {
 public:
  std::string where = "input";

  bool null() override { return value(); }
  bool boolean(bool) override { return value(); }
  bool number_integer(number_integer_t) override { return value(); }
  bool number_unsigned(number_unsigned_t) override { return value(); }
  bool number_float(number_float_t, const string_t&) override { return value(); }
  bool string(string_t&) override { return value(); }
  bool binary(binary_t&) override { return value(); }
  bool start_object(std::size_t) override {
    value();
    stack_.push_back({false, -1, ""});
    return true;
  }
  bool key(string_t& k) override {
    stack_.back().key = k;
    return true;
  }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override {
    value();
    stack_.push_back({true, -1, ""});
    return true;
  }
  bool end_array() override { return close(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    if (!stack_.empty() && stack_.back().array) ++stack_.back().index;
    std::ostringstream p;
    for (const auto& f : stack_) {
      if (f.array)
        p << '[' << f.index << ']';
      else
        p << f.key;
    }
    if (!stack_.empty() && !stack_.front().array) where = p.str();
    else if (!stack_.empty()) where += p.str();
    return false;
  }

 private:
  struct Frame {
    bool array;
    int64_t index;
    std::string key;
  };
  std::vector<Frame> stack_;
  bool value() {
    if (!stack_.empty() && stack_.back().array) ++stack_.back().index;
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }
};

std::string overflow_path(const std::string& text) {
  PathSax sax;
  (void)json::sax_parse(text, &sax);
  return sax.where;
}

}  // namespace

json read_json_input(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    if (std::cin.bad()) fail("input: cannot read standard input");
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("input: cannot open '", path, "': ", std::strerror(errno));
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (in.bad()) fail("input: cannot read '", path, "'");
  }
  return parse_json_input(text);
}

json parse_json_input(const std::string& text) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("input: invalid JSON at byte ", e.byte);
  } catch (const json::out_of_range&) {
    // A number too large for a double (1e999): name where it sits.
    fail(overflow_path(text), ": non-finite value (number out of range)");
  }
  if (!doc.is_object()) fail("input: expected a JSON object, got ", type_name(doc));
  return doc;
}

void check_known_fields(const json& obj, std::initializer_list<const char*> known) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    if (!ok) {
      std::string list;
      for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      fail(it.key(), ": unknown field (expected one of ", list, ")");
    }
  }
}

Matrix get_matrix(const json& obj, const char* field, bool allow_flat) {
  const json* v = find(obj, field);
  if (!v) fail(field, ": missing");
  if (!v->is_array())
    fail(field, ": expected ", allow_flat ? "an array" : "an array of arrays", " of numbers, got ",
         type_name(*v));
  if (v->empty()) fail(field, ": empty array");
  Matrix m;
  if (allow_flat && !(*v)[0].is_array()) {
    m.flat = true;
    m.rows = 1;
    m.cols = static_cast<int64_t>(v->size());
    m.data.reserve(v->size());
    for (int64_t c = 0; c < m.cols; ++c) m.data.push_back(entry_float((*v)[c], field, 0, c, true));
    return m;
  }
  m.rows = static_cast<int64_t>(v->size());
  for (int64_t r = 0; r < m.rows; ++r) {
    const json& row = (*v)[r];
    if (!row.is_array())
      fail(field, "[", r, "]: expected an array of numbers, got ", type_name(row));
    const auto n = static_cast<int64_t>(row.size());
    if (r == 0) {
      if (n == 0) fail(field, "[0]: empty row");
      m.cols = n;
      m.data.reserve(static_cast<size_t>(m.rows * m.cols));
    } else if (n != m.cols) {
      fail(field, ": ragged array (row ", r, " has ", n, " entries, row 0 has ", m.cols, ")");
    }
    for (int64_t c = 0; c < n; ++c) m.data.push_back(entry_float(row[c], field, r, c, false));
  }
  return m;
}

std::optional<Matrix> get_matrix_opt(const json& obj, const char* field) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return std::nullopt;
  return get_matrix(obj, field);
}

int64_t get_int(const json& obj, const char* field) {
  auto v = get_int_opt(obj, field);
  if (!v) fail(field, ": missing");
  return *v;
}

std::optional<int64_t> get_int_opt(const json& obj, const char* field) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return std::nullopt;
  int64_t out = 0;
  if (!as_integer(*v, out)) {
    if (v->is_number()) fail(field, ": expected an integer, got ", v->dump());
    fail(field, ": expected an integer, got ", type_name(*v));
  }
  return out;
}

uint64_t get_seed(const json& obj, const char* field, uint64_t def) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return def;
  if (v->is_number_unsigned()) return v->get<uint64_t>();
  int64_t out = 0;
  if (!as_integer(*v, out)) fail(field, ": expected an integer >= 0, got ", type_name(*v));
  if (out < 0) fail(field, ": must be >= 0, got ", out);
  return static_cast<uint64_t>(out);
}

double get_number(const json& obj, const char* field, double def) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return def;
  if (!v->is_number()) fail(field, ": expected a number, got ", type_name(*v));
  const double d = v->get<double>();
  if (!std::isfinite(d)) fail(field, ": non-finite value");
  return d;
}

bool get_bool(const json& obj, const char* field, bool def) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return def;
  if (!v->is_boolean()) fail(field, ": expected true or false, got ", type_name(*v));
  return v->get<bool>();
}

std::string get_string(const json& obj, const char* field, const std::string& def) {
  const json* v = find(obj, field);
  if (!v || v->is_null()) return def;
  if (!v->is_string()) fail(field, ": expected a string, got ", type_name(*v));
  return v->get<std::string>();
}

json number_json(float v, std::optional<int64_t> decimals) {
  if (decimals) {
    const double scale = std::pow(10.0, static_cast<double>(*decimals));
    double r = std::round(static_cast<double>(v) * scale) / scale;
    if (r == 0.0) r = 0.0;  // no "-0.0"
    return r;
  }
  char buf[32];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::strtod(std::string(buf, res.ptr).c_str(), nullptr);
}

json matrix_json(const float* v, int64_t rows, int64_t cols, bool flat,
                 std::optional<int64_t> decimals) {
  json out = json::array();
  for (int64_t r = 0; r < rows; ++r) {
    json row = json::array();
    for (int64_t c = 0; c < cols; ++c) row.push_back(number_json(v[r * cols + c], decimals));
    if (flat) return row;
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace moe::cli
