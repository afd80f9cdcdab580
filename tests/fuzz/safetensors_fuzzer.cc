// libFuzzer target: the safetensors header parser and validator.
//
// Two input shapes, so that both kinds of seed reach it: a whole
// .safetensors file (8-byte little-endian length, then the JSON header, as
// found on disk and in tests/fuzz/corpus/safetensors/), or the bare JSON
// header, whose data section's size is then taken from the first byte so
// that both valid and invalid layouts are reached.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size >= 9 && data[8] == '{') {
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | data[b];
    // As CheckTensorFileComplete reads it: the header must lie in the file.
    if (n <= ckptfs::core::kMaxSafetensorsHeader && n <= size - 8) {
      std::string_view json(reinterpret_cast<const char*>(data) + 8, static_cast<size_t>(n));
      (void)ckptfs::core::ParseSafetensorsHeader(json, n, size, "fuzz");
    }
    return 0;
  }
  std::string_view json(reinterpret_cast<const char*>(data), size);
  const uint64_t data_bytes = size > 0 ? data[0] * 4u : 0;
  (void)ckptfs::core::ParseSafetensorsHeader(json, size, 8 + size + data_bytes, "fuzz");
  return 0;
}
