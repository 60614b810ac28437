// A safetensors file mapped read-only: the header parsed and checked once
// (safetensors_header.hpp), tensors read in place. The pretrained loader touches only the
// bytes of the tensors it converts, and hands their pages back (release) as soon as it is
// done with them, so that a multi-GB shard never becomes resident to load one block.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "io/safetensors_header.hpp"

namespace moe::detail {

class SafetensorsView {
 public:
  // Opens, maps and checks `path`. Throws moe::Error naming the file.
  explicit SafetensorsView(const std::string& path);
  ~SafetensorsView();
  SafetensorsView(const SafetensorsView&) = delete;
  SafetensorsView& operator=(const SafetensorsView&) = delete;

  const std::string& path() const { return path_; }
  const StHeader& header() const { return header_; }
  const StEntry* find(const std::string& name) const;  // nullptr when absent
  // The first byte of a tensor's data (valid while the view lives).
  const uint8_t* data(const StEntry& e) const { return base_ + header_.data_start + e.begin; }
  // Drops the pages of bytes [offset, offset + n) of e's data from this process (they stay in
  // the page cache); later reads fault them in again. A hint: never fails.
  // margin: bytes on either side dropped too (a fault maps the whole cached folio around it,
  // so a small tensor read between large ones maps pages of matrices already handed back).
  void release(const StEntry& e, uint64_t offset, uint64_t n, uint64_t margin = 0) const;
  // Asks the kernel to start reading those bytes now (MADV_WILLNEED), so that the disk works
  // while the caller converts the bytes before them. A hint: never fails.
  void prefetch(const StEntry& e, uint64_t offset, uint64_t n) const;
  // dst = bytes [offset, offset + n) of e's data, read from the file (pread), not through the
  // mapping: large sequential reads, where faulting the mapped pages in read the same bytes at
  // half the disk's rate (docs/design.md, "Loading a block"). Throws moe::Error naming the
  // file when the read fails or comes up short (a file cut after it was opened).
  void read(const StEntry& e, uint64_t offset, uint64_t n, void* dst) const;
  uint64_t file_size() const { return size_; }

 private:
  void advise(const StEntry& e, uint64_t offset, uint64_t n, int advice, uint64_t margin = 0) const;
  std::string path_;
  int fd_ = -1;  // kept open for read()
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  StHeader header_;
  std::map<std::string, size_t> index_;
};

}  // namespace moe::detail
