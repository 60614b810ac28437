// A std::allocator whose buffers start on a 64-byte line: the low-bit weights' code bytes are
// read 64 at a time (a tile's step, an fp8 half chunk), and malloc's 16-byte alignment made
// each such load span two cache lines (an fp8 decode of K 4096 x N 14336, 2 threads, cold:
// 4-10% faster on aligned codes, docs/quant.md "Decode").
#pragma once
#include <cstddef>
#include <new>

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
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{Align}); }
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
