// Heap accounting for `moe bench`: the `moe` binary's global operator new/delete are
// replaced by counting versions (malloc + malloc_usable_size; a relaxed atomic add per call)
// so that the layer's own allocations can be measured. The buffers the library maps itself
// (huge_alloc: packed bf16 stacks, low-bit codes of 4 MiB or more) are counted through its
// observer, in whole huge pages as mapped. oneDNN's internal buffers go through malloc
// directly and are not counted.
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>

#include "bench.hpp"
#include "common/huge_pages.hpp"

namespace {

std::atomic<int64_t> g_live{0}, g_peak{0}, g_count{0}, g_largest{0};

void note_bytes(int64_t n) {
  const int64_t live = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  g_count.fetch_add(1, std::memory_order_relaxed);
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
  int64_t big = g_largest.load(std::memory_order_relaxed);
  while (n > big && !g_largest.compare_exchange_weak(big, n, std::memory_order_relaxed)) {
  }
}

void note_alloc(void* p) { note_bytes(static_cast<int64_t>(malloc_usable_size(p))); }

void note_free(void* p) {
  g_live.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}

// huge_alloc's mappings: + bytes counted as an allocation, - bytes as its free.
void note_mapped(int64_t bytes) {
  if (bytes > 0)
    note_bytes(bytes);
  else
    g_live.fetch_add(bytes, std::memory_order_relaxed);
}
const bool g_observing = (moe::detail::set_huge_observer(&note_mapped), true);

void* counted_alloc(std::size_t n) {
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  note_alloc(p);
  return p;
}

void* counted_alloc_aligned(std::size_t n, std::align_val_t al) {
  const auto a = std::max(static_cast<std::size_t>(al), sizeof(void*));
  void* p = nullptr;
  if (posix_memalign(&p, a, n ? n : 1) != 0) throw std::bad_alloc();
  note_alloc(p);
  return p;
}

void counted_free(void* p) noexcept {
  if (!p) return;
  note_free(p);
  std::free(p);
}

}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc_aligned(n, a); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }


namespace moe::cli::bench {

void HeapWindow::start() {
  base = g_live.load();
  g_peak.store(base);
  g_largest.store(0);
  count0 = g_count.load();
}
int64_t HeapWindow::peak() const { return g_peak.load() - base; }
int64_t HeapWindow::live() const { return g_live.load() - base; }
int64_t HeapWindow::largest() const { return g_largest.load(); }
int64_t HeapWindow::allocs() const { return g_count.load() - count0; }

}  // namespace moe::cli::bench
