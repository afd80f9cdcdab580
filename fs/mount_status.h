// What a running mount has done, for `ckptfs status` and the mount's
// MOUNTPOINT/.ckptfs-status file: counters, the index's size, and the last
// commits, deletions, averages and errors. Thread-safe.
#ifndef CKPTFS_FS_MOUNT_STATUS_H_
#define CKPTFS_FS_MOUNT_STATUS_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>

#include "index/index.h"

namespace ckptfs::fs {

// The virtual file at the root of every mount.
inline constexpr char kStatusFile[] = ".ckptfs-status";

enum class EventKind { kCommit, kDeletion, kAverage, kError };

class MountStatus {
 public:
  struct Identity {
    std::string name;  // --name, empty when not configured
    std::string source;
    std::string mountpoint;
    std::string index_path;
    std::string policy;  // as RetentionPolicy::ToString, empty for none
  };

  static constexpr size_t kRecentPerKind = 20;

  explicit MountStatus(Identity identity);

  void Record(EventKind kind, const std::string& what);

  // The status as JSON (one object, pretty-printed), with the index's counts.
  // Paths and messages that are not UTF-8 are escaped as core::DumpJson does.
  // keep: when set, only the recent entries for which it answers true are
  // listed (a caller's view: docs/DESIGN.md, "Security"); counts stay.
  std::string ToJson(index::Index* index,
                     const std::function<bool(const std::string& what)>& keep = nullptr) const;

 private:
  struct Event {
    double time;
    std::string what;
  };
  const Identity identity_;
  const double started_;
  mutable std::mutex mu_;
  uint64_t counts_[4] = {0, 0, 0, 0};
  std::deque<Event> recent_[4];
};

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_MOUNT_STATUS_H_
