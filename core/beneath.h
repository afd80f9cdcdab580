// Paths under the source directory, resolved beneath it without following a
// symbolic link at any component (docs/DESIGN.md, "Security").
//
// Any directory under SOURCE may belong to another user, who can swap a
// component for a symbolic link between our check and our use. So the daemon
// never hands the kernel a path string under SOURCE: it opens SOURCE once and
// resolves everything from that descriptor with
// openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
// (Linux >= 5.6; older kernels get an openat(O_NOFOLLOW) walk, one component
// at a time). Renames and deletions act on descriptors of the parent
// directories (renameat2, unlinkat), and trees are removed without ever
// following a link. Path strings remain for messages and logs.
//
// Thread-safety: a Beneath is immutable after Open; every method may be
// called from any thread. Errors: Status naming the path; a symbolic link met
// on the way is kPermission ("... crosses a symbolic link"), a path outside
// the root is kPermission.
#ifndef CKPTFS_CORE_BENEATH_H_
#define CKPTFS_CORE_BENEATH_H_

#include <sys/stat.h>
#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

#include "core/status.h"

namespace ckptfs::core {

// One owner per descriptor: closes it on destruction. Movable, not copyable.
class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() { reset(); }
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.release()) {}
  ScopedFd& operator=(ScopedFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Who asks: the uid, gid and supplementary groups of a request.
struct Caller {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  bool InGroup(gid_t g) const;
};

// Whether the mode bits of st grant caller every access in mask (R_OK,
// W_OK, X_OK), as the kernel's permission check does without ACLs: uid 0
// may read and write anything and search any directory, but executes a file
// only if some x bit is set.
bool ModeAllows(const struct stat& st, const Caller& caller, int mask);

class Beneath {
 public:
  // Opens root (an absolute path to a directory; a link in root itself is the
  // administrator's choice and is followed once, here).
  static Result<Beneath> Open(const std::string& root);

  Beneath() = default;
  Beneath(Beneath&&) = default;
  Beneath& operator=(Beneath&&) = default;

  const std::string& root() const { return root_; }
  int root_fd() const { return root_fd_.get(); }

  // path relative to the root ("." for the root itself); kPermission when
  // path is not the root or below it, or holds "." or ".." components.
  Result<std::string> Relative(const std::string& path) const;

  // Opens path (absolute, under the root) with open(2) flags; O_CLOEXEC is
  // always added. No component may be a symbolic link.
  Result<ScopedFd> OpenAt(const std::string& path, int flags, mode_t mode = 0) const;
  // The directory holding path, opened O_DIRECTORY, and path's last name.
  Result<std::pair<ScopedFd, std::string>> OpenParent(const std::string& path) const;
  // lstat(2) of path, reached beneath the root.
  Status Lstat(const std::string& path, struct stat* st) const;
  // renameat2(2) between the parents of from and to; flags as renameat2's
  // (RENAME_NOREPLACE, RENAME_EXCHANGE).
  Status Rename(const std::string& from, const std::string& to, unsigned int flags) const;

  // Whether caller may access path with mask: search permission on every
  // directory from the root down to path's parent, and mask on path itself,
  // by the mode bits read without following links (kPermission naming the
  // first component that refuses; kNotFound if a component is missing).
  Status CheckAccess(const Caller& caller, const std::string& path, int mask) const;

 private:
  std::string root_;
  ScopedFd root_fd_;
};

// Opens name in dir_fd (a relative path of any depth) with no symbolic link
// at any component: openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or a walk.
// what names the path in messages.
Result<ScopedFd> OpenBeneathFd(int dir_fd, const std::string& name, int flags, mode_t mode,
                               const std::string& what);

// Whether rel (any depth) names something in dir_fd, reached with no
// symbolic link at any component.
bool ExistsBeneath(int dir_fd, const std::string& rel);

// The names in the directory dir_fd, without "." and ".." (read through a
// duplicate of the descriptor, from its start; dir_fd stays open). what names
// the directory in messages.
Result<std::vector<std::string>> ListDirAt(int dir_fd, const std::string& what);

// Removes name in dir_fd and everything below it without following a
// symbolic link: directories are opened O_NOFOLLOW|O_DIRECTORY beneath their
// parent's descriptor and emptied with unlinkat. A name already gone is not
// an error. what names the entry in messages.
Status RemoveTreeAt(int dir_fd, const std::string& name, const std::string& what);

// ckptfs's own hidden directories in an experiment directory. They are
// created and opened only through OpenOwnDir (or OpenOwnDirUnder), never by
// a path string: a user who can write the experiment directory could have
// put a symbolic link or a directory of their own under one of these names.
inline constexpr char kTrashDir[] = ".ckptfs-trash";          // deletions in flight
inline constexpr char kStagingDir[] = ".ckptfs-staging";      // what new/ is writing
inline constexpr char kAbandonedDir[] = ".ckptfs-abandoned";  // staging left by a stopped run
// At SOURCE's root only: the pruning lease (index/lease.h).
inline constexpr char kLeaseDir[] = ".ckptfs-lease";

// Whether name is one of the four above (the mount hides them).
bool IsOwnDirName(const std::string& name);

// One of ckptfs's own hidden directories (kTrashDir, kStagingDir,
// kAbandonedDir, kLeaseDir) in the directory dir_fd (whose path is dir, for messages):
// created mode 0700 with mkdirat when create is set and it is missing, then
// checked with fstatat(AT_SYMLINK_NOFOLLOW): it must be a real directory
// owned by owner, not writable by group or others. Anything else (a
// symbolic link, a file, another owner) is refused loudly: kPermission
// naming the path and what is wrong, and it is left untouched. Returns a
// descriptor of it (O_DIRECTORY|O_NOFOLLOW). kNotFound when missing and not
// create.
Result<ScopedFd> OpenOwnDir(int dir_fd, const std::string& dir, const std::string& name,
                            uid_t owner, bool create);

// OpenOwnDir for the directory dir (absolute, under source's root, reached
// beneath it with no symbolic link), owned by the daemon's effective uid.
Result<ScopedFd> OpenOwnDirUnder(const Beneath& source, const std::string& dir,
                                 const std::string& name, bool create);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_BENEATH_H_
