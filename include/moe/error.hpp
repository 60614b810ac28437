// The public error type: every validation failure at the library's boundary throws
// moe::Error with a message that names the argument and its value. Python sees the same
// message as a ValueError.
#pragma once
#include <stdexcept>
#include <string>

namespace moe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moe
