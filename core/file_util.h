// Small filesystem and hashing helpers shared by core and index.
#ifndef CKPTFS_CORE_FILE_UTIL_H_
#define CKPTFS_CORE_FILE_UTIL_H_

#include <cstdint>
#include <string>

#include "core/status.h"

namespace ckptfs::core {

// mkdir -p with mode 0700; the error names the directory it could not make.
Status MakeDirs(const std::string& dir);

// The whole content of a (small) file; the error names the file and keeps
// the errno.
Result<std::string> ReadFile(const std::string& path);

// FNV-1a over s, from the given basis: a stable (build-independent) hash for
// file names derived from paths.
uint64_t Fnv1a(const std::string& s, uint64_t basis = 1469598103934665603ULL);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_FILE_UTIL_H_
