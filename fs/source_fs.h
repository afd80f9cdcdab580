// What kind of filesystem SOURCE lives on, and what that means for a daemon
// that shares it with others (README "Many nodes", DESIGN.md §12):
// - shared: a network or FUSE filesystem (NFS, Lustre, CephFS, SMB/CIFS,
//   FUSE), on which inotify reports only this node's changes, so the daemon
//   polls (--poll) unless told otherwise;
// - atomic_rename: false for object-store FUSE mounts (s3fs, goofys,
//   gcsfuse, rclone), whose rename copies then deletes: a commit through
//   new/ could be seen half-done, so new/ is read-only there.
#ifndef CKPTFS_FS_SOURCE_FS_H_
#define CKPTFS_FS_SOURCE_FS_H_

#include <chrono>
#include <string>

#include "core/beneath.h"

namespace ckptfs::fs {

struct SourceFilesystem {
  std::string name;  // "nfs", "lustre", "fuse.s3fs", ...; "local" when not shared
  bool shared = false;
  bool atomic_rename = true;
};

// From statfs's f_type and the fstype that /proc/self/mountinfo gives for
// the mount holding SOURCE ("" when unknown). Pure: for tests.
SourceFilesystem ClassifyFilesystem(long f_type, const std::string& mount_fstype);

// The fstype of the mount holding path (an absolute, resolved path) in
// mountinfo's text (its format: proc(5)); "" when none matches.
std::string MountFstype(const std::string& mountinfo, const std::string& path);

// statfs(source) and /proc/self/mountinfo, classified. A statfs that fails
// reads as local.
SourceFilesystem DescribeSourceFilesystem(const std::string& source);

// Whether anything in one of experiment's own hidden directories (name:
// core::kStagingDir, core::kTrashDir) was modified or changed within
// `window` of now: on a shared source, what another node is writing through
// its new/ (or deleting through it) right now, which a starting daemon must
// not take for a killed run's leftovers. Walks at most kOwnDirWalkBudget
// entries, kOwnDirWalkDepth deep, without following a link (what is past
// the budget counts as active: left alone). false when the directory is
// missing or refused (its users report that).
inline constexpr int kOwnDirWalkBudget = 100000;
inline constexpr int kOwnDirWalkDepth = 16;
bool OwnDirActive(const core::Beneath& source, const std::string& experiment,
                  const std::string& name, std::chrono::seconds window);

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_SOURCE_FS_H_
