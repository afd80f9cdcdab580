#define FUSE_USE_VERSION 314
// NodeTable's write side: new/ and the staging area behind it, and the
// bookkeeping of open files that retention and the committer rely on.
#include <dirent.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "core/log.h"
#include "fs/committer.h"
#include "fs/node_table.h"

namespace ckptfs::fs {

using core::Result;
using core::Status;
using index::NodeType;

void NodeTable::Released(const OpenedFile& file) {
  if (file.fd < 0) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(file.real_path);
    if (it != open_.end()) open_.erase(it);
  }
  if (file.writer && options_.committer != nullptr)
    options_.committer->ClosedForWrite(file.real_path);
}

bool NodeTable::IsOpen(const std::string& path) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = open_.lower_bound(path);
  return it != open_.end() && (*it == path || it->rfind(path + "/", 0) == 0);
}

void NodeTable::Wrote(const OpenedFile& file) {
  if (options_.committer != nullptr) options_.committer->Touched(file.real_path);
}

namespace {

// The first component of path below base ("X" of base/X/...).
std::string TopName(const std::string& base, const std::string& path) {
  const std::string rest = path.size() > base.size() ? path.substr(base.size() + 1) : "";
  return rest.substr(0, rest.find('/'));
}

}  // namespace

Result<NodeTable::Node> NodeTable::Writable(uint64_t ino, const Node& node, bool truncate) {
  if (!node.committed) {
    // A staged version's file may still be a link to the committed one's.
    if (node.type == NodeType::kRealFile) {
      if (Status s = options_.committer->BreakLink(node.real_path, truncate); !s.ok()) return s;
    }
    return node;
  }
  const std::string top = TopName(node.scope, node.real_path);
  const bool top_file = node.real_path == node.scope + "/" + top;
  if (Status s = options_.committer->BeginVersion(node.scope, top, top_file && truncate); !s.ok()) {
    return s;
  }
  Result<Node> now = Current(ino);
  if (!now.ok()) return now.status();
  if (now->committed) return Status::FromErrno(node.vpath + ": no new version staged", EIO);
  if (now->type == NodeType::kRealFile && !top_file) {
    if (Status s = options_.committer->BreakLink(now->real_path, truncate); !s.ok()) return s;
  }
  return now;
}

Result<std::string> NodeTable::StagedDir(uint64_t parent, const std::string& name, bool creating) {
  Result<Node> p = Current(parent);
  if (!p.ok()) return p.status();
  if (!p->staged || options_.committer == nullptr) {
    return Status::ReadOnly(p->vpath + ": read-only (write checkpoints through new/)");
  }
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      core::IsOwnDirName(name)) {
    return Status::InvalidArgument(p->vpath + "/" + name + ": not a valid name");
  }
  if (p->committed) {
    // A change inside a committed checkpoint: into a new version of it.
    p = Writable(parent, *p, false);
    if (!p.ok()) return p.status();
  }
  // The staging directory must be the daemon's own (core::OpenOwnDir; made
  // on first use through new/ itself): never a link a user planted, nor a
  // directory of theirs. Below it everything is reached beneath SOURCE.
  const bool top = p->real_path == index::StagingDir(p->scope);
  Result<core::ScopedFd> staging = options_.committer->OpenStaging(p->scope, top);
  if (!staging.ok()) return staging.status();
  // A new checkpoint may not take a name the experiment already has.
  struct stat st {};
  if (top && creating && options_.committer->source().Lstat(p->scope + "/" + name, &st).ok()) {
    return Status::Exists(p->scope + "/" + name + " already exists in the experiment");
  }
  return p->real_path;
}

Status NodeTable::RefuseSpecial(uint64_t parent, const std::string& name, const char* what) {
  Result<Node> p = Snapshot(parent);
  if (!p.ok()) return p.status();
  if (!p->staged)
    return Status::ReadOnly(p->vpath + ": read-only (write checkpoints through new/)");
  return Status::FromErrno(
      p->vpath + "/" + name + ": a " + what + " cannot be part of a checkpoint", EPERM);
}

namespace {

// The daemon runs as root for every user of an allow_other mount: what a
// user creates under new/ is theirs, as on the experiment's own filesystem.
bool ChownFor(const core::Caller* caller) {
  return caller != nullptr && ::geteuid() == 0 && caller->uid != 0;
}

// mkdir of path (under source, reached beneath it), given to caller.
Status MakeDirFor(const core::Beneath& source, const std::string& path, mode_t mode,
                  const core::Caller* caller) {
  auto in = source.OpenParent(path);
  if (!in.ok()) return in.status();
  if (::mkdirat(in->first.get(), in->second.c_str(), mode & 07777) != 0) {
    return Status::FromErrno(path, errno);
  }
  if (ChownFor(caller) && ::fchownat(in->first.get(), in->second.c_str(), caller->uid, caller->gid,
                                     AT_SYMLINK_NOFOLLOW) != 0) {
    const int err = errno;
    ::unlinkat(in->first.get(), in->second.c_str(), AT_REMOVEDIR);
    return Status::FromErrno(path + ": giving it to uid " + std::to_string(caller->uid), err);
  }
  return Status::Ok();
}

}  // namespace

Status NodeTable::MkdirReal(const Node& parent, const std::string& name, mode_t mode,
                            const core::Caller* caller) {
  const std::string path = parent.real_path + "/" + name;
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name[0] == '.' || core::IsVirtualRootName(name)) {
    return Status::InvalidArgument(parent.vpath + "/" + name + ": not a name for a new directory");
  }
  const core::Caller* restricted = Restrict(caller);
  if (restricted != nullptr) {
    if (Status allowed = Allowed(*restricted, parent.real_path, W_OK | X_OK); !allowed.ok()) {
      return allowed;
    }
  }
  if (Status made = MakeDirFor(beneath(), path, mode, caller); !made.ok()) return made;
  core::Log(core::LogLevel::kInfo, "made directory %s through the mount", path.c_str());
  return Status::Ok();
}

Result<NodeAttr> NodeTable::Mkdir(uint64_t parent, const std::string& name, mode_t mode,
                                  const core::Caller* caller) {
  {
    // A new directory of the tree (a new experiment), outside any checkpoint.
    Result<Node> p = Current(parent);
    if (!p.ok()) return p.status();
    if (!p->staged && !p->in_view && p->type == NodeType::kRealDir &&
        options_.committer != nullptr && MayCreateIn(p->real_path)) {
      if (Status made = MkdirReal(*p, name, mode, caller); !made.ok()) return made;
      return Lookup(parent, name, /*redirect=*/false);
    }
  }
  if (options_.committer == nullptr) {
    return Status::ReadOnly("mkdir " + name + ": read-only (write checkpoints through new/)");
  }
  auto writing = options_.committer->Writing();
  Result<std::string> dir = StagedDir(parent, name, true);
  if (!dir.ok()) return dir.status();
  const std::string path = *dir + "/" + name;
  if (Status made = MakeDirFor(beneath(), path, mode, caller); !made.ok()) return made;
  options_.committer->Touched(path);
  return Lookup(parent, name, /*redirect=*/false);  // mkdir must answer with a directory
}

Result<std::pair<NodeAttr, OpenedFile>> NodeTable::Create(uint64_t parent, const std::string& name,
                                                          mode_t mode, int flags,
                                                          const core::Caller* caller) {
  if (options_.committer == nullptr) {
    return Status::ReadOnly("create " + name + ": read-only (write checkpoints through new/)");
  }
  auto writing = options_.committer->Writing();
  Result<std::string> dir = StagedDir(parent, name, true);
  if (!dir.ok()) return dir.status();
  OpenedFile f;
  f.real_path = *dir + "/" + name;
  f.writer = true;
  const int open_flags = (flags & (O_ACCMODE | O_TRUNC | O_APPEND | O_EXCL)) | O_CREAT;
  Result<core::ScopedFd> fd =
      options_.committer->source().OpenAt(f.real_path, open_flags | O_NOFOLLOW, mode & 07777);
  if (!fd.ok()) return fd.status();
  // Only a file this call made changes hands (O_CREAT on an existing one
  // opens it; its owner stays).
  struct stat made {};
  if (ChownFor(caller) && ::fstat(fd->get(), &made) == 0 && made.st_uid == ::geteuid() &&
      ::fchown(fd->get(), caller->uid, caller->gid) != 0) {
    return Status::FromErrno(f.real_path + ": giving it to uid " + std::to_string(caller->uid),
                             errno);
  }
  f.fd = fd->release();
  options_.committer->OpenedForWrite(f.real_path);
  Result<NodeAttr> attr = Lookup(parent, name);
  if (!attr.ok()) {
    options_.committer->ClosedForWrite(f.real_path);
    ::close(f.fd);
    return attr.status();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    open_.insert(f.real_path);
  }
  return std::make_pair(*attr, f);
}

Status NodeTable::Unlink(uint64_t parent, const std::string& name, bool directory,
                         const core::Caller* caller) {
  if (options_.committer == nullptr) {
    return Status::ReadOnly("unlink " + name + ": read-only (write checkpoints through new/)");
  }
  auto writing = options_.committer->Writing();
  Result<Node> p = Current(parent);
  if (!p.ok()) return p.status();
  if (!p->staged) {
    return Status::ReadOnly(p->vpath + ": read-only (write checkpoints through new/)");
  }
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      core::IsOwnDirName(name)) {
    return Status::InvalidArgument(p->vpath + "/" + name + ": not a valid name");
  }
  const std::string vpath = VpathOf(*p, name);
  Result<index::Resolution> r = resolver_.Resolve(vpath, nullptr);
  if (!r.ok()) return r.status();
  const std::string& scope = r->scope;
  if (r->committed) {
    // Deleting any part of a committed checkpoint through new/ deletes it
    // whole, at once: one rename to the trash. The rest of the rmtree then
    // empties the trash copy that new/NAME now stands for.
    const std::string top = TopName(scope, r->real_path);
    const bool is_top = r->real_path == scope + "/" + top;
    if (is_top && directory) {
      // rmdir of a committed directory that still has files: as on disk.
      Result<core::ScopedFd> dir = beneath().OpenAt(r->real_path, O_RDONLY | O_DIRECTORY);
      if (!dir.ok()) return dir.status();
      DIR* d = ::fdopendir(dir->get());
      if (d == nullptr) return Status::FromErrno(r->real_path, errno);
      dir->release();
      std::unique_ptr<DIR, int (*)(DIR*)> guard(d, ::closedir);
      while (struct dirent* e = ::readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
          return Status::FromErrno(vpath, ENOTEMPTY);
        }
      }
    }
    const core::Caller* restricted = Restrict(caller);
    if (restricted != nullptr) {
      // As rename(2) out of the experiment would require: write and search
      // on it, and in a sticky (shared) one, owning the checkpoint or it.
      if (Status allowed = Allowed(*restricted, scope, W_OK | X_OK); !allowed.ok()) return allowed;
      struct stat exp_st {
      }, top_st{};
      if (beneath().Lstat(scope, &exp_st).ok() && (exp_st.st_mode & S_ISVTX) != 0 &&
          beneath().Lstat(scope + "/" + top, &top_st).ok() && restricted->uid != exp_st.st_uid &&
          restricted->uid != top_st.st_uid) {
        return Status::FromErrno(vpath + ": another user's checkpoint in a sticky directory",
                                 EPERM);
      }
    }
    Status deleted =
        options_.committer->DeleteThroughNew(scope, top, caller ? caller->uid : ::getuid());
    if (!deleted.ok()) return deleted;
    if (is_top && !directory) return Status::Ok();  // a single file: gone
    r = resolver_.Resolve(vpath, nullptr);          // into the trash copy
    if (!r.ok()) return r.status();
  }
  const std::string& path = r->real_path;
  auto in = beneath().OpenParent(path);
  if (!in.ok()) return in.status();
  if (::unlinkat(in->first.get(), in->second.c_str(), directory ? AT_REMOVEDIR : 0) != 0) {
    return Status::FromErrno(vpath, errno);
  }
  if (directory) {
    // The rmdir that ends an rmtree through new/: the trash copy is gone.
    std::optional<std::string> deleting = options_.committer->Deleting(scope, name);
    if (deleting && *deleting == path) options_.committer->DeleteFinished(scope, name);
  }
  options_.committer->Touched(path);
  return Status::Ok();
}

Status NodeTable::Rename(uint64_t parent, const std::string& name, uint64_t new_parent,
                         const std::string& new_name, unsigned int flags) {
  if (options_.committer == nullptr) {
    return Status::ReadOnly("rename " + name + ": read-only (write checkpoints through new/)");
  }
  auto writing = options_.committer->Writing();
  Result<std::string> from = StagedDir(parent, name, false);
  if (!from.ok()) return from.status();
  Result<std::string> to = StagedDir(new_parent, new_name, true);
  if (!to.ok()) return to.status();
  // Only within one staging area: a commit is the committer's rename.
  const std::string marker = std::string("/") + index::kStagingDir;
  if (from->substr(0, from->find(marker)) != to->substr(0, to->find(marker))) {
    return Status::FromErrno(*from + "/" + name + " -> " + *to + "/" + new_name, EXDEV);
  }
  const std::string a = *from + "/" + name, b = *to + "/" + new_name;
  if (flags != 0 && flags != RENAME_NOREPLACE) return Status::FromErrno(a, EINVAL);
  if (Status s = options_.committer->source().Rename(a, b, flags); !s.ok()) return s;
  options_.committer->Touched(a);
  options_.committer->Touched(b);
  return Status::Ok();
}

Result<NodeAttr> NodeTable::SetAttr(uint64_t ino, const struct stat& attr, int to_set, int fd) {
  std::shared_lock<std::shared_mutex> writing;
  if (options_.committer != nullptr) writing = options_.committer->Writing();
  Result<Node> node = Current(ino);
  if (!node.ok()) return node.status();
  if (!node->staged || options_.committer == nullptr || node->type == NodeType::kVirtualDir) {
    return Status::ReadOnly(node->vpath + ": read-only (write checkpoints through new/)");
  }
  if (fd < 0) {
    // A committed entry changes in a new version; a file of that version
    // stops sharing its inode with the committed one first.
    const bool truncate = (to_set & FUSE_SET_ATTR_SIZE) != 0 && attr.st_size == 0;
    node = Writable(ino, *node, truncate);
    if (!node.ok()) return node.status();
  }
  // Beneath SOURCE, by descriptor: the staging area is the daemon's own, but
  // the experiment above it may belong to anyone.
  const std::string& path = node->real_path;
  auto in = beneath().OpenParent(path);
  if (!in.ok()) return in.status();
  const int dir_fd = in->first.get();
  const char* name = in->second.c_str();
  if (to_set & FUSE_SET_ATTR_SIZE) {
    int rc;
    if (fd >= 0) {
      rc = ::ftruncate(fd, attr.st_size);
    } else {
      Result<core::ScopedFd> file = beneath().OpenAt(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK);
      if (!file.ok()) return file.status();
      rc = ::ftruncate(file->get(), attr.st_size);
    }
    if (rc != 0) return Status::FromErrno(path, errno);
  }
  if (to_set & FUSE_SET_ATTR_MODE) {
    if (::fchmodat(dir_fd, name, attr.st_mode & 07777, 0) != 0)
      return Status::FromErrno(path, errno);
  }
  if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
    struct timespec ts[2];
    ts[0].tv_nsec = ts[1].tv_nsec = UTIME_OMIT;
    if (to_set & FUSE_SET_ATTR_ATIME) ts[0] = attr.st_atim;
    if (to_set & FUSE_SET_ATTR_ATIME_NOW) ts[0].tv_nsec = UTIME_NOW;
    if (to_set & FUSE_SET_ATTR_MTIME) ts[1] = attr.st_mtim;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW) ts[1].tv_nsec = UTIME_NOW;
    if (::utimensat(dir_fd, name, ts, AT_SYMLINK_NOFOLLOW) != 0) {
      return Status::FromErrno(path, errno);
    }
  }
  options_.committer->Touched(path);
  return GetAttr(ino);
}

}  // namespace ckptfs::fs
