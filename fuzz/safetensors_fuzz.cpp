// fuzz/safetensors_fuzz.cpp: libFuzzer target for the safetensors reader.
//
// Input byte 0 picks the shape of the file: odd: the bytes are the whole file; even: the rest is
// the JSON header, wrapped in a valid length prefix and followed by 256 data bytes, so the fuzzer
// spends its time in the per-tensor validation rather than on the 8-byte length. Parsing must
// succeed or throw recurformer::Error (anything else aborts); every tensor it hands out is read
// in full, so ASan catches a validation gap.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "recurformer/model/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::vector<uint8_t> file;
  if (data[0] & 1) {
    file.assign(data + 1, data + size);
  } else {
    const uint64_t n = size - 1;
    file.resize(8 + n + 256, 0x5a);
    for (int i = 0; i < 8; ++i) file[size_t(i)] = uint8_t(n >> (8 * i));
    if (n) std::memcpy(file.data() + 8, data + 1, n);
  }
  try {
    const auto f = recurformer::SafetensorsFile::parse({file.data(), file.size()}, "fuzz.safetensors");
    unsigned sum = 0;
    for (const auto& t : f.tensors()) {
      const auto* p = static_cast<const uint8_t*>(t.data);
      for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    }
    for (const auto& kv : f.metadata()) sum += unsigned(kv.second.size());
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const recurformer::Error&) {
  }
  return 0;
}
