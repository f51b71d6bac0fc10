// recurformer/model/mmap_file.hpp: a read-only memory map of a whole file (POSIX), RAII.
//
// Checkpoint tensors are read in place from the map: nothing is copied at load time and the OS
// pages weights in on first use (and can drop them again under memory pressure). The parsers take
// a ByteSpan so they also run on bytes in memory (tests, fuzzers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>


namespace recurformer {

/// A non-owning range of bytes.
struct ByteSpan {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

/// A read-only mapping of a file; movable, not copyable. An empty file maps to an empty span.
class MappedFile {
 public:
  MappedFile() = default;
  /// Maps `path`; throws Error "PATH: cannot open (reason)" and the like.
  explicit MappedFile(const std::string& path);
  MappedFile(MappedFile&& o) noexcept { swap(o); }
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  ByteSpan bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  void swap(MappedFile& o) noexcept;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace recurformer
