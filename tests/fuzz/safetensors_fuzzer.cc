// libFuzzer target: the safetensors header parser and validator.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view json(reinterpret_cast<const char*>(data), size);
  // The data section's size is taken from the first byte so that both valid
  // and invalid layouts are reached.
  const uint64_t data_bytes = size > 0 ? data[0] * 4u : 0;
  (void)ckptfs::core::ParseSafetensorsHeader(json, size, 8 + size + data_bytes, "fuzz");
  return 0;
}
