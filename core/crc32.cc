#include "core/crc32.h"

#include <isa-l/crc.h>

namespace ckptfs::core {

uint32_t Crc32(uint32_t crc, const void* data, size_t n) {
  if (n == 0) return crc;
  return crc32_gzip_refl(crc, static_cast<const unsigned char*>(data), n);
}

}  // namespace ckptfs::core
