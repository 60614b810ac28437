#include "io/io_util.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "common/check.hpp"

namespace moe::detail {

bool utf8_valid(const std::string& s, size_t* bad_at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  auto fail = [&](size_t at) {
    if (bad_at) *bad_at = at;
    return false;
  };
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return fail(i);  // a continuation byte or 0xf8..0xff where a sequence should start
    }
    if (n - i < len) return fail(i);
    for (size_t j = 1; j < len; ++j) {
      if ((p[i + j] & 0xc0) != 0x80) return fail(i + j);
      cp = (cp << 6) | (p[i + j] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return fail(i);
    i += len;
  }
  return true;
}

namespace {
std::string errno_text() { return std::strerror(errno); }

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}
}  // namespace

AtomicFile::AtomicFile(const std::string& path)
    : path_(path), tmp_(cat(path, ".tmp.", static_cast<long>(::getpid()))) {
  MOE_REQUIRE(!path.empty(), "cannot write a file with an empty path");
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd_ < 0)
    throw Error(cat("cannot write '", path_, "': creating '", tmp_, "' failed (", errno_text(),
                    ")"));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  MOE_ASSERT(fd_ >= 0 && !committed_);
  const auto* b = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, b, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      throw Error(cat("cannot write '", path_, "': writing '", tmp_, "' failed (",
                      w == 0 ? std::string("no progress") : errno_text(), ")"));
    b += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  MOE_ASSERT(fd_ >= 0 && !committed_);
  // The data must be on disk before the rename makes it visible, or a crash could leave a
  // complete-looking name over incomplete contents.
  if (::fsync(fd_) != 0)
    throw Error(cat("cannot write '", path_, "': fsync of '", tmp_, "' failed (", errno_text(),
                    ")"));
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0)
    throw Error(cat("cannot write '", path_, "': closing '", tmp_, "' failed (", errno_text(),
                    ")"));
  if (::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw Error(cat("cannot write '", path_, "': renaming '", tmp_, "' over it failed (",
                    errno_text(), ")"));
  committed_ = true;
  // Persist the rename itself; a failure here cannot undo it, so it is best effort.
  const int dir = ::open(parent_dir(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

}  // namespace moe::detail
