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
#include <vector>

#include "common/huge_pages.hpp"

namespace moe::detail {

// Huge = false: always operator new (scratch that grows and is reused: workspaces), so that
// `moe bench`'s heap accounting (cli/bench_heap.cpp, which counts operator new) sees it.
template <typename T, std::size_t Align = 64, bool Huge = true>
struct AlignedAllocator {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = AlignedAllocator<U, Align, Huge>;
  };
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U, Align, Huge>&) noexcept {}
  T* allocate(std::size_t n) {
    if (Huge && n * sizeof(T) >= kHugeAllocMin) return static_cast<T*>(huge_alloc(n * sizeof(T)));
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (Huge && n * sizeof(T) >= kHugeAllocMin) return huge_free(p, n * sizeof(T));
    ::operator delete(p, std::align_val_t{Align});
  }
  template <typename U>
  bool operator==(const AlignedAllocator<U, Align, Huge>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const AlignedAllocator<U, Align, Huge>&) const noexcept {
    return false;
  }
};

// 64-byte aligned scratch, from operator new whatever its size.
template <typename T>
using AlignedScratch = std::vector<T, AlignedAllocator<T, 64, false>>;

}  // namespace moe::detail
