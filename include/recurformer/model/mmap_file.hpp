// recurformer/model/mmap_file.hpp: a read-only memory map of a whole file (POSIX), RAII.
//
// Checkpoint tensors are read in place from the map: nothing is copied at load time and the OS
// pages weights in on first use (and can drop them again under memory pressure). The parsers take
// a ByteSpan so they also run on bytes in memory (tests, fuzzers).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "recurformer/core/error.hpp"

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
  explicit MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    RF_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      fail(path, ": cannot stat (", std::strerror(e), ")");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(path, ": not a regular file");
    }
    size_ = size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        fail(path, ": cannot mmap ", size_, " bytes (", std::strerror(e), ")");
      }
      data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);  // the mapping stays valid without the descriptor
  }
  MappedFile(MappedFile&& o) noexcept { swap(o); }
  MappedFile& operator=(MappedFile&& o) noexcept {
    MappedFile tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  ByteSpan bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  void swap(MappedFile& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(path_, o.path_);
  }
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace recurformer
