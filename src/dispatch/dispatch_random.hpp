// Random draws of dispatch (drop_policy "random", second_expert_policy "random"): the same
// counter-based Philox-4x32-10 as the router noise, keyed by the seed, with the counter
// (stream·2^30 + block, token lo, token hi, step mod 2^32). The router noise uses stream 0
// (block = expert / 4 < 2^30), so each use below owns a disjoint set of counters and a draw
// depends only on (seed, step, global token, stream, word), never on threads or batch split.
#pragma once
#include <cstdint>

#include "common/philox.hpp"

namespace moe::detail {

enum class DispatchStream : uint32_t {
  drop_priority = 1,  // drop_policy "random": one 32-bit priority per (token, rank)
  second_expert = 2,  // second_expert_policy "random": one uniform per token
};

// The 32-bit word `word` (any index >= 0) of stream s for one global token.
inline uint32_t dispatch_bits(uint64_t seed, uint64_t step, int64_t token, DispatchStream s,
                              int64_t word) {
  const uint32_t block = (static_cast<uint32_t>(s) << 30) | static_cast<uint32_t>(word / 4);
  Philox4 c = philox_counter(step, token, 0);
  c.v[0] = block;
  const Philox4 r =
      philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return r.v[word % 4];
}

// A uniform in [0, 1) with 32 random bits (exact in double).
inline double dispatch_uniform(uint64_t seed, uint64_t step, int64_t token, DispatchStream s,
                               int64_t word) {
  return static_cast<double>(dispatch_bits(seed, step, token, s, word)) * (1.0 / 4294967296.0);
}

}  // namespace moe::detail
