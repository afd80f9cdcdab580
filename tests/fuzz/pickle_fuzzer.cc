// libFuzzer target: the code-free pickle reader on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto root = ckptfs::core::pickle::Unpickle(bytes, "fuzz");
  if (root.ok()) (void)ckptfs::core::pickle::FindTensors(root->root, "fuzz");
  return 0;
}
