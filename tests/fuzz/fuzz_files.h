// Scratch files for the fuzz targets that go through the disk (averaging,
// the scanner): one private directory per process, on tmpfs when there is
// one (/dev/shm) so that an execution costs no disk I/O, removed at exit.
// Header-only so that both the libFuzzer build and the g++ replay driver
// (replay_main.cc) compile it into each target. Not thread-safe: libFuzzer
// and the replay driver run one input at a time.
#ifndef CKPTFS_TESTS_FUZZ_FUZZ_FILES_H_
#define CKPTFS_TESTS_FUZZ_FUZZ_FILES_H_

#include <fcntl.h>
#include <ftw.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ckptfs::fuzz {

inline int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) {
  return ::remove(path);
}

// Removes path and everything below it (no symlinks followed).
inline void RemoveTree(const std::string& path) {
  ::nftw(path.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
}

// The process's scratch directory, created on first use.
inline const std::string& ScratchDir() {
  static const std::string dir = [] {
    std::string base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    if (const char* t = std::getenv("CKPTFS_FUZZ_TMPDIR"); t != nullptr && *t != '\0') base = t;
    std::string templ = base + "/ckptfs-fuzz-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) {
      std::perror(templ.c_str());
      std::abort();  // no scratch space: the harness cannot run at all
    }
    static std::string keep = templ;
    std::atexit([] { RemoveTree(keep); });
    return templ;
  }();
  return dir;
}

// Writes bytes to path (created or truncated); aborts if the disk refuses,
// which is the harness's failure, not the code under test's.
inline void WriteFileOrDie(const std::string& path, const uint8_t* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  size_t off = 0;
  while (off < size) {
    ssize_t n = ::write(fd, data + off, size - off);
    if (n <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    off += static_cast<size_t>(n);
  }
  ::close(fd);
}


}  // namespace ckptfs::fuzz

#endif  // CKPTFS_TESTS_FUZZ_FUZZ_FILES_H_
