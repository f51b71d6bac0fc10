// recurformer/model/safetensors.hpp: the safetensors format, read in place from a memory map, and
// written atomically (the converter's RecurFormer checkpoints).
//
// File layout: u64 little-endian N, N bytes of JSON header {"name": {"dtype", "shape",
// "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are relative to
// the data start. Every entry is validated against the file before any tensor is handed out
// (offsets in range, no overlaps, shape x dtype size == byte length, alignment to the element size),
// so a truncated or hostile file is a one-line Error naming the file and the problem, never a read
// out of bounds. Dtypes F32, F16 and BF16 are supported; others are a clear error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/model/mmap_file.hpp"

namespace recurformer {

/// A named tensor in a checkpoint: dense row-major, read-only, owned by the file (or Checkpoint)
/// it came from. Shapes use the HF (PyTorch) order: a linear weight is [out, in].
struct TensorRef {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  /// The values; null for a block-quantised tensor whose fp32 decoding was not kept
  /// (CheckpointOptions::decode_quantised false): read its blocks then.
  const void* data = nullptr;
  /// A GGUF block-quantised tensor also keeps its blocks as stored ([.., cols / block] blocks of
  /// type `quant`, in the file's map) beside the fp32 decoding in `data`, so a linear layer can
  /// read 2.6-8.5 bits per weight instead of 32. Null for dense tensors.
  const void* blocks = nullptr;
  GgmlType quant = GgmlType::f32;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * size_t(dtype_size(dtype)); }
  /// "[2048, 64]".
  std::string shape_str() const;
  /// A dense view of the data as T (must be the tensor's dtype) with rank N (must match).
  template <class T, int N>
  View<const T, N> view() const {
    RF_CHECK(dtype_of<T>() == dtype, "tensor ", name, ": dtype is ", dtype_name(dtype), ", requested ",
             dtype_name(dtype_of<T>()));
    RF_CHECK(int(shape.size()) == N, "tensor ", name, ": shape ", shape_str(), " has rank ", shape.size(),
             ", requested rank ", N);
    RF_CHECK(data != nullptr || numel() == 0, "tensor ", name, ": its fp32 decoding was not kept (the checkpoint was ",
             "opened with decode_quantised = false); read its blocks");
    int64_t ext[N];
    for (int d = 0; d < N; ++d) ext[d] = shape[size_t(d)];
    return make_view(static_cast<const T*>(data), ext);
  }
};

namespace detail {

/// The largest header this reader accepts (the reference implementation's limit too).
constexpr uint64_t kMaxSafetensorsHeader = uint64_t(100) << 20;

}  // namespace detail

/// A parsed safetensors file. open() maps and owns the file; parse() reads bytes the caller keeps
/// alive. Movable; TensorRef data pointers stay valid across moves.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  /// Parses bytes in memory; `source` names them in errors. The bytes must outlive the result.
  static SafetensorsFile parse(ByteSpan bytes, const std::string& source);

  const std::string& source() const { return source_; }
  const std::vector<TensorRef>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorRef* find(const std::string& name) const;
  /// The tensor, or Error "FILE: missing tensor NAME".
  const TensorRef& tensor(const std::string& name) const;

 private:
  void parse_bytes(ByteSpan b, const std::string& src);

  MappedFile map_;
  std::string source_;
  std::vector<TensorRef> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Writes `tensors` (dtype, shape, data each) and string metadata to `path` as safetensors.
/// The data section starts 8-byte aligned and tensors are stored contiguously (as every reader
/// requires), 4-byte tensors first, so each tensor is aligned to its element size. The file is
/// written to PATH.tmp-PID, flushed to disk, then renamed over PATH: a reader never sees half a file.
void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace recurformer
