// JSON in and out for the `moe gate` / `moe route` commands: reading a document from a file
// or standard input, and typed field access whose every failure is an InputError naming the
// field, so that main() can report one line and exit with status 2.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"

namespace moe::cli {

using json = nlohmann::json;

// Bad user input (exit status 2). moe::Error from the library is reported the same way.
class InputError : public moe::Error {
 public:
  using moe::Error::Error;
};

// Reads and parses path ("-" is standard input). The document must be a JSON object.
json read_json_input(const std::string& path);
// The parsing half of read_json_input, on text already in memory (the fuzzers' entry).
json parse_json_input(const std::string& text);

// Every key of obj must be one of known; the first unknown one is an error naming it.
void check_known_fields(const json& obj, std::initializer_list<const char*> known);

// A row-major float32 matrix read from a JSON array of arrays (or, where allowed, a flat
// array: one row, and flat = true so that output can keep the input's shape).
struct Matrix {
  int64_t rows = 0, cols = 0;
  bool flat = false;
  std::vector<float> data;
};

// Missing, ill-typed, empty, ragged and non-finite (after conversion to float32) values are
// errors naming the field and, for an entry, its position.
Matrix get_matrix(const json& obj, const char* field, bool allow_flat = false);
std::optional<Matrix> get_matrix_opt(const json& obj, const char* field);

int64_t get_int(const json& obj, const char* field);  // required integer
std::optional<int64_t> get_int_opt(const json& obj, const char* field);
uint64_t get_seed(const json& obj, const char* field, uint64_t def);  // integer >= 0
double get_number(const json& obj, const char* field, double def);    // finite number
bool get_bool(const json& obj, const char* field, bool def);
std::string get_string(const json& obj, const char* field, const std::string& def);

// A float as JSON: rounded to `decimals` places when given, else the shortest decimal that
// reads back as the same float32 (so 0.25f prints as 0.25, not 0.25000000372529).
json number_json(float v, std::optional<int64_t> decimals);

// rows × cols values as a JSON array of arrays, or a flat array when flat.
json matrix_json(const float* v, int64_t rows, int64_t cols, bool flat,
                 std::optional<int64_t> decimals);

}  // namespace moe::cli
