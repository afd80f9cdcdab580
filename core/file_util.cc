#include "core/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <utility>

namespace ckptfs::core {

Status MakeDirs(const std::string& dir) {
  for (size_t pos = 1; pos != std::string::npos;) {
    pos = dir.find('/', pos + 1);
    const std::string part = dir.substr(0, pos);
    if (::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST) {
      return Status::FromErrno("cannot create " + part, errno);
    }
  }
  return Status::Ok();
}

Result<std::string> ReadFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(path, errno);
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return Status::FromErrno(path, err);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

namespace {

int64_t Nanos(const struct timespec& t) { return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec; }

}  // namespace

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

InputFile::InputFile(InputFile&& other) noexcept { *this = std::move(other); }

InputFile& InputFile::operator=(InputFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    size_ = other.size_;
    dev_ = other.dev_, ino_ = other.ino_;
    mtime_ns_ = other.mtime_ns_, ctime_ns_ = other.ctime_ns_;
    other.fd_ = -1;
  }
  return *this;
}

Status InputFile::Open(const std::string& path) {
  if (fd_ >= 0) ::close(fd_);
  path_ = path;
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) return Status::FromErrno(path, errno);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(path, errno);
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + ": not a regular file");
  size_ = static_cast<uint64_t>(st.st_size);
  dev_ = st.st_dev, ino_ = st.st_ino;
  mtime_ns_ = Nanos(st.st_mtim), ctime_ns_ = Nanos(st.st_ctim);
  return Status::Ok();
}

Status InputFile::ReadAt(uint64_t offset, void* buf, size_t n) const {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    if (offset > static_cast<uint64_t>(INT64_MAX) - n) {
      return Status::Corrupt(path_ + ": read past the largest file offset");
    }
    const ssize_t got = ::pread(fd_, p, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(path_, errno);
    }
    if (got == 0) {
      return Status::Corrupt(path_ + ": ends at " + std::to_string(offset) + " bytes, was " +
                             std::to_string(size_) + " (truncated while being read)");
    }
    p += got, n -= static_cast<size_t>(got), offset += static_cast<uint64_t>(got);
  }
  return Status::Ok();
}

Status InputFile::CheckUnchanged() const {
  struct stat now {};
  if (::fstat(fd_, &now) != 0) return Status::FromErrno(path_, errno);
  struct stat named {};
  std::string what;
  if (::stat(path_.c_str(), &named) != 0) {
    what = "removed";
  } else if (named.st_dev != dev_ || named.st_ino != ino_) {
    what = "replaced by another file";
  } else if (static_cast<uint64_t>(now.st_size) != size_) {
    what = "size " + std::to_string(size_) + " -> " + std::to_string(now.st_size);
  } else if (Nanos(now.st_mtim) != mtime_ns_ || Nanos(now.st_ctim) != ctime_ns_) {
    what = "modified";
  }
  if (what.empty()) return Status::Ok();
  return Status::Corrupt(path_ + ": changed while it was read (" + what + ")");
}

uint64_t Fnv1a(const std::string& s, uint64_t basis) {
  uint64_t h = basis;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace ckptfs::core
