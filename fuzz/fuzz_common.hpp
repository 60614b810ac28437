// What every libmoe fuzz target holds the code to: bad input may only surface as moe::Error.
// Any other exception (std::bad_alloc, std::length_error, a json::type_error) escapes the
// target and libFuzzer reports it as a crash, like a sanitizer finding or an abort.
#pragma once
#include <cstdlib>
#include <omp.h>

namespace moe::fuzz {

// One OpenMP thread: the fuzzer runs one input at a time, and threads only add noise to
// the coverage signal and to leak checks.
inline int init_once() {
  omp_set_num_threads(1);
  return 0;
}

}  // namespace moe::fuzz
