// When a loop is worth an OpenMP team.
#pragma once
#include <cstdint>

namespace moe::detail {

// Elementwise loops over fewer values than this run on the calling thread: waking a team
// costs more than the work. The choice depends on sizes only, and each element's value does
// not depend on the partition, so results stay bit-identical for any thread count.
inline constexpr int64_t kParallelMin = int64_t{1} << 14;

}  // namespace moe::detail
