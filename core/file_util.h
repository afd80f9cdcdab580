// Small filesystem and hashing helpers shared by core and index.
#ifndef CKPTFS_CORE_FILE_UTIL_H_
#define CKPTFS_CORE_FILE_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"

namespace ckptfs::core {

// mkdir -p with mode 0700; the error names the directory it could not make.
Status MakeDirs(const std::string& dir);

// The whole content of a (small) file; the error names the file and keeps
// the errno.
Result<std::string> ReadFile(const std::string& path);

// Checkpoint files are read in chunks of this size (a multiple of every
// element size): memory per reader is bounded, and work between two chunks
// is short enough to check for cancellation (core/cancel.h).
inline constexpr size_t kReadChunk = size_t{4} << 20;

// A file read with pread at explicit offsets, never mapped: a file truncated
// while it is read gives an error naming it, not SIGBUS. Open records the
// file's identity (device, inode, size, mtime, ctime); CheckUnchanged says
// whether the file, and the path, still have it, so that work done over a
// file that changed under it is refused. Owns its descriptor; movable;
// thread-compatible (pread keeps no file position).
class InputFile {
 public:
  InputFile() = default;
  ~InputFile();
  InputFile(InputFile&& other) noexcept;
  InputFile& operator=(InputFile&& other) noexcept;
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  Status Open(const std::string& path);  // a regular file
  // Exactly n bytes at offset; kCorrupt naming the file when it ends first
  // (it is shorter than it was at Open: truncated while being read).
  Status ReadAt(uint64_t offset, void* buf, size_t n) const;
  // kCorrupt "PATH: changed while it was read (...)" when the open file's
  // size, mtime or ctime, or the inode the path names, differ from Open's.
  Status CheckUnchanged() const;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }  // at Open

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t dev_ = 0, ino_ = 0;
  int64_t mtime_ns_ = 0, ctime_ns_ = 0;
};

// FNV-1a over s, from the given basis: a stable (build-independent) hash for
// file names derived from paths.
uint64_t Fnv1a(const std::string& s, uint64_t basis = 1469598103934665603ULL);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_FILE_UTIL_H_
