#include "index/lease.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

namespace ckptfs::index {

using core::Result;
using core::Status;

Result<Lease> Lease::Open(const core::Beneath& source) {
  Result<core::ScopedFd> dir =
      core::OpenOwnDir(source.root_fd(), source.root(), core::kLeaseDir, ::geteuid(), true);
  if (!dir.ok()) return dir.status();
  const std::string path = source.root() + "/" + core::kLeaseDir + "/" + kLeaseFile;
  const int raw =
      ::openat(dir->get(), kLeaseFile, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
  if (raw < 0) {
    const int err = errno;
    if (err == ELOOP) return Status::Permission(path + ": a symbolic link; refused", EPERM);
    return Status::FromErrno(path, err);
  }
  core::ScopedFd fd(raw);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(path, errno);
  if (!S_ISREG(st.st_mode))
    return Status::Permission(path + ": not a regular file; refused", EPERM);
  if (st.st_uid != ::geteuid()) {
    return Status::Permission(path + ": owned by uid " + std::to_string(st.st_uid) +
                                  ", not this daemon's (uid " + std::to_string(::geteuid()) +
                                  "); refused",
                              EPERM);
  }
  return Lease(std::move(fd), path);
}

Lease::Lease(Lease&& other) noexcept
    : fd_(std::move(other.fd_)), path_(std::move(other.path_)), held_(other.held_) {
  other.held_ = false;
}

Lease::~Lease() = default;

Result<bool> Lease::TryAcquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (held_) return true;
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;  // the whole file, whatever its length
  if (::fcntl(fd_.get(), F_OFD_SETLK, &fl) != 0) {
    const int err = errno;
    if (err == EAGAIN || err == EACCES) return false;
    return Status::FromErrno("lock " + path_, err);
  }
  held_ = true;
  char host[HOST_NAME_MAX + 1] = {};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "?");
  const std::string who = std::string(host) + " " + std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_.get(), 0) == 0) {
    ssize_t ignored = ::pwrite(fd_.get(), who.data(), who.size(), 0);  // a hint for messages only
    (void)ignored;
  }
  return true;
}

void Lease::Release() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!held_) return;
  struct flock fl {};
  fl.l_type = F_UNLCK;
  fl.l_whence = SEEK_SET;
  ::fcntl(fd_.get(), F_OFD_SETLK, &fl);
  held_ = false;
}

bool Lease::held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_;
}

std::string Lease::Holder() const {
  char buf[HOST_NAME_MAX + 32] = {};
  const ssize_t n = ::pread(fd_.get(), buf, sizeof(buf) - 1, 0);
  if (n <= 0) return "";
  std::string who(buf, static_cast<size_t>(n));
  while (!who.empty() && (who.back() == '\n' || who.back() == '\0')) who.pop_back();
  return who;
}

}  // namespace ckptfs::index
