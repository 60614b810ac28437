// Memory for the large buffers a layer fills once and streams often (the packed expert
// weights): mapped on its own and 2 MiB aligned, so that transparent huge pages can back it
// (THP "always" does so by itself); MOE_HUGE_PAGES=1 also advises MADV_HUGEPAGE (for THP
// "madvise").
//
// Why not advise by default: a loaded Mixtral-8x7B block packs 2.8 GB, and on 4 KiB pages its
// first touch is 690 000 page faults; on huge pages a load whose memory was just freed by
// another ran in 0.55 s instead of 1.3 s. But on the project's virtual machine, whose host
// backs guest memory lazily, a fresh process's first touch of huge pages was slower than of
// small ones (loads of 5.0–9.1 s against 3.0–4.3 s), and that is how a block is usually
// loaded (docs/design.md, "Loading a block").
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe::detail {

// Buffers at least this large come from huge_alloc; smaller ones from the heap.
constexpr size_t kHugeAllocMin = size_t{4} << 20;

// bytes (> 0) of memory, uninitialised (in fact zero, as the kernel maps it), 2 MiB aligned.
// Throws std::bad_alloc when the mapping fails.
void* huge_alloc(size_t bytes);
// Whether huge_alloc advises huge pages (MOE_HUGE_PAGES=1).
bool huge_pages_advised();
// Returns what huge_alloc(bytes) gave.
void huge_free(void* p, size_t bytes) noexcept;

// Told the bytes each huge_alloc maps (+) and each huge_free unmaps (-), rounded up to whole
// huge pages. These buffers bypass operator new, so `moe bench`'s heap accounting
// (cli/bench_heap.cpp) sets one to count the packed bf16 stacks and the low-bit codes in its
// parameter and peak figures. nullptr (the default) observes nothing. Must not throw.
using HugeObserver = void (*)(int64_t bytes);
void set_huge_observer(HugeObserver f) noexcept;

}  // namespace moe::detail
