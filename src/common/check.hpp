// Two tiers of errors (STYLE.md item 6): MOE_REQUIRE validates at the public boundary and
// throws moe::Error with a message naming the argument; MOE_ASSERT guards internal
// invariants and aborts with file and line.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "moe/error.hpp"

namespace moe::detail {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "libmoe internal error: %s failed at %s:%d\n", expr, file, line);
  std::abort();
}

}  // namespace moe::detail

#define MOE_REQUIRE(cond, ...)                                   \
  do {                                                           \
    if (!(cond)) throw ::moe::Error(::moe::detail::cat(__VA_ARGS__)); \
  } while (0)

#define MOE_ASSERT(cond) \
  do {                   \
    if (!(cond)) ::moe::detail::assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)
