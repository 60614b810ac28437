// A std::allocator whose buffers start on a 64-byte line: the low-bit weights' code bytes are
// read 64 at a time (a tile's step, an fp8 half chunk), and malloc's 16-byte alignment made
// each such load span two cache lines (an fp8 decode of K 4096 x N 14336, 2 threads, cold:
// 4-10% faster on aligned codes, docs/quant.md "Decode"). Buffers of kHugeAllocMin or more
// come from huge_alloc, as the packed bf16 stacks do (common/huge_pages.hpp: 2 MiB aligned,
// huge pages advised under MOE_HUGE_PAGES=1; an int4 decode of one row, 4096 x 14336 tiled,
// 2 threads, cold read 5-6% faster from huge pages than from small ones, alternating in one
// process).
#pragma once
#include <cstddef>
#include <new>

#include "common/huge_pages.hpp"

namespace moe::detail {

template <typename T, std::size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) noexcept {}
  T* allocate(std::size_t n) {
    if (n * sizeof(T) >= kHugeAllocMin) return static_cast<T*>(huge_alloc(n * sizeof(T)));
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) >= kHugeAllocMin) return huge_free(p, n * sizeof(T));
    ::operator delete(p, std::align_val_t{Align});
  }
  template <typename U>
  bool operator==(const AlignedAllocator<U, Align>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const AlignedAllocator<U, Align>&) const noexcept {
    return false;
  }
};

}  // namespace moe::detail
