// libFuzzer target: the query-path grammar on arbitrary paths.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/query_path.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view path(reinterpret_cast<const char*>(data), size);
  auto segments = ckptfs::core::SplitPath(path);
  if (segments.ok()) (void)ckptfs::core::ParseQuery(*segments);
  return 0;
}
