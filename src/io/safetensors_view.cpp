#include "io/safetensors_view.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/check.hpp"

namespace moe::detail {

SafetensorsView::SafetensorsView(const std::string& path) : path_(path) {
  const std::string what = cat("safetensors file '", path, "'");
  const int fd = fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(cat(what, ": cannot open (", std::strerror(errno), ")"));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fd_ = -1;
    throw Error(cat(what, ": not a regular file"));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fd_ = -1;
      throw Error(cat(what, ": cannot map (", std::strerror(err), ")"));
    }
    base_ = static_cast<const uint8_t*>(p);
  }
  try {
    header_ = parse_safetensors_header(base_, size_, what);
  } catch (...) {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
    ::close(fd_);
    throw;
  }
  for (size_t i = 0; i < header_.entries.size(); ++i) index_[header_.entries[i].name] = i;
}

SafetensorsView::~SafetensorsView() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  if (fd_ >= 0) ::close(fd_);
}

const StEntry* SafetensorsView::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.entries[it->second];
}

void SafetensorsView::advise(const StEntry& e, uint64_t offset, uint64_t n, int advice,
                             uint64_t margin) const {
  if (!base_ || n == 0) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t a0 = header_.data_start + e.begin + offset;
  const uint64_t a = a0 > margin ? a0 - margin : 0;
  n += a0 - a + margin;
  // Whole pages around the range: a neighbour's page dropped too is only read again.
  const uint64_t lo = a / page * page;
  const uint64_t hi = std::min<uint64_t>((a + n + page - 1) / page * page, (size_ + page - 1) / page * page);
  ::madvise(const_cast<uint8_t*>(base_) + lo, hi - lo, advice);
}

void SafetensorsView::release(const StEntry& e, uint64_t offset, uint64_t n,
                              uint64_t margin) const {
  advise(e, offset, n, MADV_DONTNEED, margin);
}

void SafetensorsView::prefetch(const StEntry& e, uint64_t offset, uint64_t n) const {
  advise(e, offset, n, MADV_WILLNEED);
}

}  // namespace moe::detail

namespace moe::detail {

void SafetensorsView::read(const StEntry& e, uint64_t offset, uint64_t n, void* dst) const {
  MOE_ASSERT(offset + n <= e.end - e.begin);
  auto* out = static_cast<uint8_t*>(dst);
  uint64_t at = header_.data_start + e.begin + offset;
  while (n > 0) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{1} << 30));
    const ssize_t got = ::pread(fd_, out, want, static_cast<off_t>(at));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      throw Error(cat("safetensors file '", path_, "': cannot read tensor '", e.name, "' (",
                      got < 0 ? std::strerror(errno) : "the file ends early", ")"));
    out += got;
    at += static_cast<uint64_t>(got);
    n -= static_cast<uint64_t>(got);
  }
}

}  // namespace moe::detail
