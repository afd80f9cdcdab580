// Internal to NodeTable's files (node_table*.cc): small helpers they share.
#ifndef CKPTFS_FS_NODE_TABLE_INTERNAL_H_
#define CKPTFS_FS_NODE_TABLE_INTERNAL_H_

#include <cerrno>
#include <ctime>
#include <string>

#include "core/status.h"

namespace ckptfs::fs::internal {

inline struct timespec Now() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

inline std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? "/" : path.substr(0, slash);
}

// A refusal as the caller sees it: EACCES, or ENOENT for what is gone.
inline core::Status Denied(const core::Status& s, const std::string& path) {
  if (s.code() == core::StatusCode::kNotFound || s.sys_errno() == ENOENT) {
    return core::Status::FromErrno(path, ENOENT);
  }
  return core::Status::FromErrno(path + " (" + s.message() + ")", EACCES);
}

inline bool Under(const std::string& path, const std::string& root) {
  return path == root || path.rfind(root + "/", 0) == 0;
}

}  // namespace ckptfs::fs::internal

#endif  // CKPTFS_FS_NODE_TABLE_INTERNAL_H_
