// Memory for the large buffers a layer fills once and streams often (the packed expert
// weights): mapped on its own, 2 MiB aligned, and advised for transparent huge pages.
//
// Why: a loaded Mixtral-8x7B block packs 2.8 GB; on 4 KiB pages its first touch is 690 000
// page faults, which took most of a load from the page cache (docs/design.md, "Loading a
// block"). Huge pages also spare the products' streaming reads the TLB misses of 4 KiB pages.
// Where the kernel gives no huge pages (THP "never"), the advice is ignored and the memory is
// plain anonymous memory. MOE_HUGE_PAGES=0 leaves the advice out: in a virtual machine whose
// host backs guest memory lazily, the first touch of a fresh huge page can be slower than 512
// small ones (docs/design.md, "Loading a block").
#pragma once
#include <cstddef>

namespace moe::detail {

// Buffers at least this large come from huge_alloc; smaller ones from the heap.
constexpr size_t kHugeAllocMin = size_t{4} << 20;

// bytes (> 0) of memory, uninitialised (in fact zero, as the kernel maps it), 2 MiB aligned.
// Throws std::bad_alloc when the mapping fails.
void* huge_alloc(size_t bytes);
// Whether huge_alloc advises huge pages (MOE_HUGE_PAGES is not "0").
bool huge_pages_advised();
// Returns what huge_alloc(bytes) gave.
void huge_free(void* p, size_t bytes) noexcept;

}  // namespace moe::detail
