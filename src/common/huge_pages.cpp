#include "common/huge_pages.hpp"

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>

namespace moe::detail {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
size_t rounded(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }
std::atomic<HugeObserver> g_observer{nullptr};
void observe(int64_t bytes) {
  if (const HugeObserver f = g_observer.load(std::memory_order_relaxed)) f(bytes);
}
}  // namespace

void set_huge_observer(HugeObserver f) noexcept { g_observer.store(f); }

bool huge_pages_advised() {
  static const bool advised = [] {
    const char* v = std::getenv("MOE_HUGE_PAGES");
    return v && std::string(v) == "1";
  }();
  return advised;
}

void* huge_alloc(size_t bytes) {
  const size_t len = rounded(bytes);
  // One huge page more than needed, then the unaligned head and the tail handed back.
  void* raw = ::mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const auto at = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (at + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > at) ::munmap(raw, aligned - at);
  const uintptr_t end = at + len + kHugePage;
  if (end > aligned + len) ::munmap(reinterpret_cast<void*>(aligned + len), end - aligned - len);
#ifdef MADV_HUGEPAGE
  if (huge_pages_advised())  // advice: the kernel may refuse it
    ::madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);
#endif
  observe(static_cast<int64_t>(len));
  return reinterpret_cast<void*>(aligned);
}

void huge_free(void* p, size_t bytes) noexcept {
  if (!p) return;
  ::munmap(p, rounded(bytes));
  observe(-static_cast<int64_t>(rounded(bytes)));
}

}  // namespace moe::detail
