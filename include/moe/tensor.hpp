// A minimal owning float32 tensor: a shape and a contiguous row-major buffer. Parameters,
// gradients and checkpoints use it; kernels take raw pointers and sizes.
#pragma once
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace moe {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> s, float fill = 0.0f) : shape(std::move(s)) {
    data.assign(static_cast<size_t>(numel_of(shape)), fill);
  }
  int64_t numel() const { return static_cast<int64_t>(data.size()); }
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
  bool empty() const { return data.empty(); }

  static int64_t numel_of(const std::vector<int64_t>& s) {
    return std::accumulate(s.begin(), s.end(), int64_t{1}, std::multiplies<int64_t>());
  }
};

// "[2, 3]" — used in error messages.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace moe
