// File helpers shared by the checkpoint code and the tools that write run outputs: UTF-8
// validation and atomic replacement of a file (temporary in the same folder, fsync, rename).
#pragma once
#include <cstddef>
#include <string>

namespace moe::detail {

// True when s is well-formed UTF-8 (no overlong forms, no surrogates, nothing past
// U+10FFFF). On false, *bad_at (when given) is the offset of the first bad byte.
bool utf8_valid(const std::string& s, size_t* bad_at = nullptr);

// Writes `path` so that readers see either the old file or the complete new one, never a
// half-written one: the bytes go to `<path>.tmp.<pid>`, commit() fsyncs and renames it over
// `path`. If commit() is not reached (an exception, a failed write) the destructor removes
// the temporary. Every failure throws moe::Error naming the file and errno's text.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// The whole of `contents` into `path`, atomically.
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace moe::detail
