#include "core/beneath.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

namespace ckptfs::core {
namespace {

// Trees deeper than this are refused rather than walked (a crafted tree must
// not exhaust the stack or the descriptor table).
constexpr int kMaxTreeDepth = 256;

std::vector<std::string> Components(const std::string& rel) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= rel.size()) {
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    out.push_back(rel.substr(start, slash - start));
    start = slash + 1;
  }
  return out;
}

Status ErrnoStatus(const std::string& what, int err) {
  if (err == ELOOP) return Status::Permission(what + ": crosses a symbolic link (refused)");
  if (err == EXDEV) return Status::Permission(what + ": leaves the source directory (refused)");
  return Status::FromErrno(what, err);
}

// The walk for kernels without openat2: one component at a time, never
// following a link (O_NOFOLLOW on each; O_PATH|O_DIRECTORY fails on a link).
Result<ScopedFd> WalkOpen(int dir_fd, const std::string& rel, int flags, mode_t mode,
                          const std::string& what) {
  std::vector<std::string> parts = Components(rel);
  ScopedFd cur;
  int at = dir_fd;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    if (parts[i] == "..")
      return Status::Permission(what + ": leaves the source directory (refused)");
    int fd = ::openat(at, parts[i].c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return ErrnoStatus(what, errno == ENOTDIR ? ELOOP : errno);
    cur.reset(fd);
    at = cur.get();
  }
  if (parts.back() == "..")
    return Status::Permission(what + ": leaves the source directory (refused)");
  int fd = ::openat(at, parts.back().c_str(), flags | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) return ErrnoStatus(what, errno);
  return ScopedFd(fd);
}

}  // namespace

void ScopedFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

bool Caller::InGroup(gid_t g) const {
  return g == gid || std::find(groups.begin(), groups.end(), g) != groups.end();
}

bool ModeAllows(const struct stat& st, const Caller& caller, int mask) {
  if (caller.uid == 0) {
    if (!(mask & X_OK)) return true;
    return S_ISDIR(st.st_mode) || (st.st_mode & (S_IXUSR | S_IXGRP | S_IXOTH)) != 0;
  }
  mode_t bits;
  if (caller.uid == st.st_uid) {
    bits = (st.st_mode >> 6) & 7;
  } else if (caller.InGroup(st.st_gid)) {
    bits = (st.st_mode >> 3) & 7;
  } else {
    bits = st.st_mode & 7;
  }
  return (static_cast<mode_t>(mask) & 7 & ~bits) == 0;
}

Result<ScopedFd> OpenBeneathFd(int dir_fd, const std::string& name, int flags, mode_t mode,
                               const std::string& what) {
  struct open_how how {};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  for (int attempt = 0;; ++attempt) {
    long fd = ::syscall(SYS_openat2, dir_fd, name.c_str(), &how, sizeof(how));
    if (fd >= 0) return ScopedFd(static_cast<int>(fd));
    // EAGAIN: a concurrent rename raced the resolution; the kernel asks for a retry.
    if (errno == EAGAIN && attempt < 8) continue;
    if (errno == ENOSYS) return WalkOpen(dir_fd, name, flags, mode, what);
    return ErrnoStatus(what, errno);
  }
}

Result<Beneath> Beneath::Open(const std::string& root) {
  int fd = ::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(root, errno);
  Beneath b;
  b.root_ = root;
  while (b.root_.size() > 1 && b.root_.back() == '/') b.root_.pop_back();
  b.root_fd_.reset(fd);
  return b;
}

Result<std::string> Beneath::Relative(const std::string& path) const {
  if (path == root_) return std::string(".");
  const std::string prefix = root_ == "/" ? "/" : root_ + "/";
  if (path.compare(0, prefix.size(), prefix) != 0 || path.size() == prefix.size()) {
    return Status::Permission(path + ": not under " + root_ + " (refused)");
  }
  std::string rel = path.substr(prefix.size());
  for (const std::string& part : Components(rel)) {
    if (part.empty() || part == "." || part == "..") {
      return Status::Permission(path + ": not a plain path under " + root_ + " (refused)");
    }
  }
  return rel;
}

Result<ScopedFd> Beneath::OpenAt(const std::string& path, int flags, mode_t mode) const {
  Result<std::string> rel = Relative(path);
  if (!rel.ok()) return rel.status();
  return OpenBeneathFd(root_fd_.get(), *rel, flags, mode, path);
}

Result<std::pair<ScopedFd, std::string>> Beneath::OpenParent(const std::string& path) const {
  Result<std::string> rel = Relative(path);
  if (!rel.ok()) return rel.status();
  if (*rel == ".") return Status::Permission(path + ": the source directory itself (refused)");
  size_t slash = rel->rfind('/');
  std::string dir = slash == std::string::npos ? "." : rel->substr(0, slash);
  std::string name = slash == std::string::npos ? *rel : rel->substr(slash + 1);
  Result<ScopedFd> fd = OpenBeneathFd(root_fd_.get(), dir, O_RDONLY | O_DIRECTORY, 0,
                                      path.substr(0, path.rfind('/')));
  if (!fd.ok()) return fd.status();
  return std::make_pair(std::move(*fd), name);
}

Status Beneath::Lstat(const std::string& path, struct stat* st) const {
  if (path == root_) {
    if (::fstat(root_fd_.get(), st) != 0) return Status::FromErrno(path, errno);
    return Status::Ok();
  }
  auto parent = OpenParent(path);
  if (!parent.ok()) return parent.status();
  if (::fstatat(parent->first.get(), parent->second.c_str(), st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(path, errno);
  }
  return Status::Ok();
}

Status Beneath::Rename(const std::string& from, const std::string& to, unsigned int flags) const {
  auto a = OpenParent(from);
  if (!a.ok()) return a.status();
  auto b = OpenParent(to);
  if (!b.ok()) return b.status();
  if (::renameat2(a->first.get(), a->second.c_str(), b->first.get(), b->second.c_str(), flags) !=
      0) {
    int err = errno;
    return err == EEXIST ? Status::Exists(to + ": already exists")
                         : Status::FromErrno(from + " -> " + to, err);
  }
  return Status::Ok();
}

Status Beneath::CheckAccess(const Caller& caller, const std::string& path, int mask) const {
  Result<std::string> rel = Relative(path);
  if (!rel.ok()) return rel.status();
  struct stat st {};
  if (::fstat(root_fd_.get(), &st) != 0) return Status::FromErrno(root_, errno);
  std::vector<std::string> parts = *rel == "." ? std::vector<std::string>{} : Components(*rel);
  if (parts.empty()) {
    if (!ModeAllows(st, caller, mask)) return Status::Permission(path + ": permission denied");
    return Status::Ok();
  }
  ScopedFd cur;
  int at = root_fd_.get();
  std::string walked = root_;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!ModeAllows(st, caller, X_OK)) return Status::Permission(walked + ": permission denied");
    walked += "/" + parts[i];
    if (::fstatat(at, parts[i].c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      return Status::FromErrno(walked, errno);
    }
    if (i + 1 == parts.size()) break;
    if (!S_ISDIR(st.st_mode)) {
      return S_ISLNK(st.st_mode) ? ErrnoStatus(walked, ELOOP) : Status::FromErrno(walked, ENOTDIR);
    }
    Result<ScopedFd> next = OpenBeneathFd(at, parts[i], O_PATH | O_DIRECTORY, 0, walked);
    if (!next.ok()) return next.status();
    cur = std::move(*next);
    at = cur.get();
  }
  if (!ModeAllows(st, caller, mask)) return Status::Permission(path + ": permission denied");
  return Status::Ok();
}

namespace {

Status RemoveTreeDepth(int dir_fd, const std::string& name, const std::string& what, int depth) {
  struct stat st {};
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return errno == ENOENT ? Status::Ok() : Status::FromErrno(what, errno);
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(dir_fd, name.c_str(), 0) != 0 && errno != ENOENT) {
      return Status::FromErrno(what, errno);
    }
    return Status::Ok();
  }
  if (depth >= kMaxTreeDepth) {
    return Status::Corrupt(what + ": more than " + std::to_string(kMaxTreeDepth) +
                           " directory levels (refused)");
  }
  int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? Status::Ok() : ErrnoStatus(what, errno);
  ScopedFd dir(fd);
  Result<std::vector<std::string>> names = ListDirAt(dir.get(), what);
  if (!names.ok()) return names.status();
  Status status;
  for (const std::string& n : *names) {
    Status s = RemoveTreeDepth(dir.get(), n, what + "/" + n, depth + 1);
    if (!s.ok() && status.ok()) status = s;
  }
  if (!status.ok()) return status;
  if (::unlinkat(dir_fd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) {
    return Status::FromErrno(what, errno);
  }
  return Status::Ok();
}

}  // namespace

bool ExistsBeneath(int dir_fd, const std::string& rel) {
  return OpenBeneathFd(dir_fd, rel, O_PATH, 0, rel).ok();
}

Result<std::vector<std::string>> ListDirAt(int dir_fd, const std::string& what) {
  const int fd = ::dup(dir_fd);
  DIR* d = fd < 0 ? nullptr : ::fdopendir(fd);
  if (d == nullptr) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    return Status::FromErrno(what, err);
  }
  ::rewinddir(d);
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(std::move(n));
  }
  ::closedir(d);
  return names;
}

Status RemoveTreeAt(int dir_fd, const std::string& name, const std::string& what) {
  return RemoveTreeDepth(dir_fd, name, what, 0);
}

Result<ScopedFd> OpenOwnDir(int dir_fd, const std::string& dir, const std::string& name,
                            uid_t owner, bool create) {
  const std::string path = dir + "/" + name;
  if (create && ::mkdirat(dir_fd, name.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::FromErrno(path, errno);
  }
  struct stat st {};
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return errno == ENOENT ? Status::NotFound(path + ": missing") : Status::FromErrno(path, errno);
  }
  auto refuse = [&](const std::string& why) {
    return Status::Permission(path + ": " + why + "; ckptfs will not use it (remove it by hand)");
  };
  if (S_ISLNK(st.st_mode)) return refuse("is a symbolic link, not ckptfs's own directory");
  if (!S_ISDIR(st.st_mode)) return refuse("is not a directory");
  if (st.st_uid != owner) {
    return refuse("is owned by uid " + std::to_string(st.st_uid) + ", not " +
                  std::to_string(owner));
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) return refuse("is writable by other users");
  int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(path, errno);
  ScopedFd out(fd);
  struct stat again {};
  if (::fstat(fd, &again) != 0) return Status::FromErrno(path, errno);
  if (again.st_dev != st.st_dev || again.st_ino != st.st_ino) {
    return refuse("was replaced while it was checked");
  }
  return out;
}

bool IsOwnDirName(const std::string& name) {
  return name == kTrashDir || name == kStagingDir || name == kAbandonedDir || name == kLeaseDir;
}

Result<ScopedFd> OpenOwnDirUnder(const Beneath& source, const std::string& dir,
                                 const std::string& name, bool create) {
  Result<ScopedFd> parent = source.OpenAt(dir, O_RDONLY | O_DIRECTORY);
  if (!parent.ok()) return parent.status();
  return OpenOwnDir(parent->get(), dir, name, ::geteuid(), create);
}

}  // namespace ckptfs::core
