// Versions of committed checkpoints and deletions through new/ (the
// Committer's half that works on what is already committed; committer.h).
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_NOREPLACE (glibc >= 2.28, _GNU_SOURCE)
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>

#include "core/averaging.h"
#include "core/checkpoint.h"
#include "core/file_util.h"
#include "core/log.h"
#include "core/meta.h"
#include "core/retention.h"
#include "fs/committer.h"
#include "index/resolver.h"

namespace ckptfs::fs {

using core::LogLevel;
using core::Status;

namespace {

// Recreates the directory tree of src_fd in dst_fd (what: its path, for
// messages): directories with their modes and owners, regular files as hard
// links to the same inodes; anything else is left out (never committed).
Status LinkTree(int src_fd, int dst_fd, const std::string& what, int depth = 0) {
  if (depth > 32) return Status::InvalidArgument(what + ": nested too deeply");
  core::Result<std::vector<std::string>> names = core::ListDirAt(src_fd, what);
  if (!names.ok()) return names.status();
  for (const std::string& n : *names) {
    struct stat st {};
    if (::fstatat(src_fd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone
    if (S_ISREG(st.st_mode)) {
      if (::linkat(src_fd, n.c_str(), dst_fd, n.c_str(), 0) != 0) {
        return Status::FromErrno("link " + what + "/" + n, errno);
      }
    } else if (S_ISDIR(st.st_mode)) {
      if (::mkdirat(dst_fd, n.c_str(), st.st_mode & 07777) != 0) {
        return Status::FromErrno("mkdir " + what + "/" + n, errno);
      }
      if (::geteuid() == 0)
        ::fchownat(dst_fd, n.c_str(), st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW);
      core::Result<core::ScopedFd> from =
          core::OpenBeneathFd(src_fd, n, O_RDONLY | O_DIRECTORY, 0, n);
      core::Result<core::ScopedFd> to =
          core::OpenBeneathFd(dst_fd, n, O_RDONLY | O_DIRECTORY, 0, n);
      if (!from.ok()) return from.status();
      if (!to.ok()) return to.status();
      if (Status s = LinkTree(from->get(), to->get(), what + "/" + n, depth + 1); !s.ok()) return s;
    }
  }
  return Status::Ok();
}

// Makes name in dir_fd a new file with src's mode, owner and (unless
// truncate) data: src is the descriptor of the file it was (a link to a
// committed version's file, or that file itself). what names it.
Status FreshCopyAt(int dir_fd, const std::string& name, int src, bool truncate,
                   const std::string& what) {
  struct stat st {};
  if (::fstat(src, &st) != 0) return Status::FromErrno(what, errno);
  const int raw =
      ::openat(dir_fd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
               st.st_mode & 07777);
  if (raw < 0) return Status::FromErrno(what, errno);
  core::ScopedFd out(raw);
  if (::geteuid() == 0 && ::fchown(out.get(), st.st_uid, st.st_gid) != 0) {
    return Status::FromErrno(what + ": keeping its owner", errno);
  }
  if (truncate) return Status::Ok();
  off_t in_off = 0;
  while (in_off < st.st_size) {
    const ssize_t n = ::copy_file_range(src, &in_off, out.get(), nullptr,
                                        static_cast<size_t>(st.st_size - in_off), 0);
    if (n < 0) return Status::FromErrno("copy " + what, errno);
    if (n == 0) break;
  }
  return Status::Ok();
}

}  // namespace

Status Committer::BeginVersion(const std::string& experiment, const std::string& name,
                               bool truncate_file) {
  core::Result<core::ScopedFd> exp = source_->OpenAt(experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return exp.status();
  core::Result<core::ScopedFd> staging = OpenStaging(experiment, true);
  if (!staging.ok()) return staging.status();
  std::lock_guard<std::mutex> lock(version_mu_);  // one version per name at a time
  struct stat st {};
  if (::fstatat(staging->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    return Status::Ok();  // a version is staged already
  }
  if (::fstatat(exp->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(experiment + "/" + name, errno);
  }
  const std::string top = index::StagingDir(experiment) + "/" + name;
  if (S_ISDIR(st.st_mode)) {
    if (::mkdirat(staging->get(), name.c_str(), st.st_mode & 07777) != 0) {
      return Status::FromErrno("mkdir " + top, errno);
    }
    if (::geteuid() == 0) {
      ::fchownat(staging->get(), name.c_str(), st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW);
    }
    core::Result<core::ScopedFd> from =
        core::OpenBeneathFd(exp->get(), name, O_RDONLY | O_DIRECTORY, 0, name);
    core::Result<core::ScopedFd> to =
        core::OpenBeneathFd(staging->get(), name, O_RDONLY | O_DIRECTORY, 0, name);
    Status linked = !from.ok() ? from.status()
                    : !to.ok() ? to.status()
                               : LinkTree(from->get(), to->get(), top);
    if (!linked.ok()) {
      (void)core::RemoveTreeAt(staging->get(), name, top);
      return linked;
    }
  } else if (S_ISREG(st.st_mode)) {
    const int raw =
        ::openat(exp->get(), name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (raw < 0) return Status::FromErrno(experiment + "/" + name, errno);
    core::ScopedFd committed(raw);
    struct stat again {};
    if (::fstat(committed.get(), &again) != 0 || again.st_ino != st.st_ino) {
      return Status::FromErrno(experiment + "/" + name + " (replaced meanwhile)", EAGAIN);
    }
    if (Status s = FreshCopyAt(staging->get(), name, committed.get(), truncate_file, top);
        !s.ok()) {
      ::unlinkat(staging->get(), name.c_str(), 0);
      return s;
    }
  } else {
    return Status::InvalidArgument(experiment + "/" + name + ": not a file or directory");
  }
  {
    std::lock_guard<std::mutex> state(mu_);
    Staged& s = staged_[{experiment, name}];
    s.replaces = true;
    s.old_dev = st.st_dev;
    s.old_ino = st.st_ino;
    s.old_ctime = st.st_ctim;
    s.last = Clock::now();
  }
  core::Log(LogLevel::kInfo, "new version of %s/%s started through new/", experiment.c_str(),
            name.c_str());
  return Status::Ok();
}

Status Committer::BreakLink(const std::string& path, bool truncate) {
  auto in = source_->OpenParent(path);
  if (!in.ok()) return in.status();
  const int dir_fd = in->first.get();
  const std::string& name = in->second;
  const int raw = ::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (raw < 0) return errno == ENOENT ? Status::Ok() : Status::FromErrno(path, errno);
  core::ScopedFd old(raw);
  struct stat st {};
  if (::fstat(old.get(), &st) != 0) return Status::FromErrno(path, errno);
  // Staged files are never hard links of their own (link() is refused under
  // new/): a second link is the committed version's.
  if (!S_ISREG(st.st_mode) || st.st_nlink < 2) return Status::Ok();
  if (::unlinkat(dir_fd, name.c_str(), 0) != 0) return Status::FromErrno(path, errno);
  return FreshCopyAt(dir_fd, name, old.get(), truncate, path);
}

Status Committer::DeleteThroughNew(const std::string& experiment, const std::string& name,
                                   uid_t by) {
  core::Result<core::ScopedFd> exp = source_->OpenAt(experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return exp.status();
  const std::string what = experiment + "/" + name;
  struct stat st {};
  if (::fstatat(exp->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(what, errno);
  }
  if (S_ISDIR(st.st_mode) && core::ExistsBeneath(exp->get(), name + "/.keep")) {
    return Status::Permission(what + ": pinned (.keep); not deleted through new/", EPERM);
  }
  auto moved = core::MoveToTrashAt(exp->get(), experiment, name);
  if (!moved.ok()) return moved.status();
  const std::string trash = experiment + "/" + core::kTrashDir + "/" + moved->second;
  core::Log(LogLevel::kInfo, "deleted %s through new/ (uid %u): moved to %s", what.c_str(),
            static_cast<unsigned>(by), trash.c_str());
  if (S_ISDIR(st.st_mode)) {
    std::lock_guard<std::mutex> lock(mu_);
    deleting_[{experiment, name}] = Deletion{trash, Clock::now()};
  } else if (::unlinkat(moved->first.get(), moved->second.c_str(), 0) != 0) {
    core::Log(LogLevel::kWarning, "cannot remove %s: %s", trash.c_str(), std::strerror(errno));
  }
  if (on_deleted_) on_deleted_(experiment, name);
  return Status::Ok();
}

std::optional<std::string> Committer::Deleting(const std::string& experiment,
                                               const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = deleting_.find({experiment, name});
  if (it == deleting_.end()) return std::nullopt;
  return it->second.trash;
}

void Committer::DeleteFinished(const std::string& experiment, const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  deleting_.erase({experiment, name});
}

void Committer::ExpireDeletions(bool everything) {
  std::vector<std::pair<std::string, std::string>> expired;  // (experiment, trash path)
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Clock::now();
    for (auto it = deleting_.begin(); it != deleting_.end();) {
      if (everything || now - it->second.since > std::chrono::minutes(1)) {
        expired.emplace_back(it->first.first, it->second.trash);
        it = deleting_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (const auto& [experiment, trash] : expired) {
    // An rmtree that stopped half-way: what it left goes now.
    core::Result<core::ScopedFd> exp = source_->OpenAt(experiment, O_RDONLY | O_DIRECTORY);
    if (!exp.ok()) continue;
    core::Result<core::ScopedFd> t =
        core::OpenOwnDir(exp->get(), experiment, core::kTrashDir, ::geteuid(), false);
    if (!t.ok()) continue;
    const std::string entry = trash.substr(trash.rfind('/') + 1);
    (void)core::RemoveTreeAt(t->get(), entry, trash);
  }
}

}  // namespace ckptfs::fs
