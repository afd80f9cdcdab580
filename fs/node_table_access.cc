// What a node shows and to whom: its attributes, its extended attributes,
// and the per-caller permission checks of an allow_other mount (README
// "Security"). The rest of NodeTable is in node_table.cc and
// node_table_write.cc.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "core/log.h"
#include "core/pickle_audit.h"
#include "fs/committer.h"
#include "fs/node_table.h"
#include "fs/node_table_internal.h"

namespace ckptfs::fs {

using core::Result;
using core::Status;
using core::StatusCode;
using index::NodeType;
using internal::Denied;
using internal::DirOf;
using internal::Now;
using internal::Under;

namespace {

constexpr char kXattrRealPath[] = "user.ckptfs.real_path";
constexpr char kXattrCheckpoint[] = "user.ckptfs.checkpoint";
constexpr char kXattrMembers[] = "user.ckptfs.members";
constexpr char kXattrGlobals[] = "user.ckptfs.globals";

}  // namespace

Result<NodeAttr> NodeTable::AttrOf(uint64_t ino, const Node& node) const {
  NodeAttr a;
  struct stat& st = a.st;
  if (node.as_link) {
    st.st_mode = S_IFLNK | 0777;
    st.st_nlink = 1;
    st.st_size = static_cast<off_t>(node.real_path.size());
    st.st_atim = st.st_mtim = st.st_ctim = mount_time_;
    st.st_uid = ::getuid();
    st.st_gid = ::getgid();
  } else if (node.staged &&
             (node.type == NodeType::kVirtualDir ||
              node.real_path == index::StagingDir(node.scope)) &&
             beneath().Lstat(node.scope, &st).ok()) {
    // new/ is the experiment, writable: its owner and mode (so the kernel's
    // default_permissions lets write exactly those who may write the
    // experiment), not those of the private staging directory behind it.
    st.st_mode = S_IFDIR | (st.st_mode & 07777);
    st.st_nlink = 2;
  } else if (node.type == NodeType::kVirtualDir || node.type == NodeType::kIndexJson ||
             node.type == NodeType::kAverageFile) {
    const bool dir = node.type == NodeType::kVirtualDir;
    const bool status = IsStatusFile(node);  // changes with every event
    st.st_mode = dir ? (S_IFDIR | (node.staged ? 0755 : 0555)) : (S_IFREG | 0444);
    st.st_nlink = dir ? 2 : 1;
    st.st_size =
        static_cast<off_t>(status ? options_.status->ToJson(index_).size() : node.content_size);
    st.st_atim = st.st_mtim = st.st_ctim = status ? Now() : mount_time_;
    st.st_uid = ::getuid();
    st.st_gid = ::getgid();
  } else {
    // Under the source (staging included): beneath its descriptor, so a
    // directory swapped for a symbolic link shows nothing of what the link
    // points to. An average's real_path is a file name inside its members.
    Status got = node.members.empty() ? beneath().Lstat(node.real_path, &st)
                 : ::lstat(node.real_path.c_str(), &st) == 0
                     ? Status::Ok()
                     : Status::FromErrno(node.real_path, errno);
    if (!got.ok()) {
      const bool gone = got.sys_errno() == ENOENT || got.code() == StatusCode::kNotFound;
      if (gone && node.in_view && node.has_last) {
        a.st = node.last;
        a.timeout = 0;
        return a;
      }
      if (gone) return Status::FromErrno(node.real_path, ENOENT);
      return got.code() == StatusCode::kPermission ? Denied(got, node.real_path) : got;
    }
    if (node.key_ino != 0 && st.st_ino != node.key_ino) {
      // The file behind this name was replaced (a new version committed):
      // this inode stands for the old file, which open descriptors still
      // read; its size must not become the new file's.
      if (node.has_last) {
        a.st = node.last;
        a.timeout = 0;
        return a;
      }
      return Status::FromErrno(node.real_path, ENOENT);
    }
    if (!node.members.empty()) {
      // An average carries the owner and mode of its newest member, so the
      // kernel's default_permissions applies to it as to that file.
      struct stat newest {};
      const std::string first = node.members.substr(0, node.members.find('\n'));
      if (beneath().Lstat(first, &newest).ok()) {
        st.st_uid = newest.st_uid;
        st.st_gid = newest.st_gid;
        st.st_mode = (st.st_mode & S_IFMT) | (newest.st_mode & 07777);
      }
    }
    // Read-only outside new/, but for the real directories where a new
    // experiment may be made (mkdir -p MOUNT/asr/exp2/new).
    if (!node.staged && !(node.type == NodeType::kRealDir && !node.in_view &&
                          options_.committer != nullptr && MayCreateIn(node.real_path))) {
      st.st_mode &= ~static_cast<mode_t>(0222);
    }
  }
  st.st_ino = ino;
  st.st_blksize = 1 << 20;  // readers size their reads from this
  const bool real = node.type == NodeType::kRealDir || node.type == NodeType::kRealFile ||
                    node.type == NodeType::kRealOther;
  const bool watched = !real || node.as_link || !options_.is_watched ||
                       options_.is_watched(DirOf(node.real_path)) ||
                       (node.type == NodeType::kRealDir && options_.is_watched(node.real_path));
  // Writers change new/; the status file changes with every event. With
  // other users on the mount, what a view shows depends on who asks, and
  // the kernel's caches are shared: such entries are never cached.
  const bool per_caller =
      options_.multi_user &&
      (node.in_view || node.type == NodeType::kIndexJson || !node.members.empty());
  a.timeout = node.staged || IsStatusFile(node) || per_caller ? 0
              : watched                                       ? kLongTimeout
                                                              : kShortTimeout;
  return a;
}

Result<std::string> NodeTable::GetXattr(uint64_t ino, const std::string& name,
                                        const core::Caller* caller) {
  caller = Restrict(caller);
  Result<Node> node = Snapshot(ino);
  if (!node.ok()) return node.status();
  if (caller != nullptr) {
    Status reach = Reachable(*node, *caller);
    if (!reach.ok()) return reach;
  }
  if (name == kXattrRealPath && !node->real_path.empty()) return node->real_path;
  if (name == kXattrCheckpoint && !node->checkpoint.empty()) return node->checkpoint;
  if (name == kXattrMembers && !node->members.empty()) return node->members;
  if (name == kXattrGlobals) {
    const std::string file = TensorFileOf(*node);
    if (!file.empty()) {
      // The member file's own pickle, read without running it: nothing is
      // averaged or converted (an average's pickle is its newest member's).
      Result<core::ScopedFd> fd = beneath().OpenAt(file, O_RDONLY | O_NOFOLLOW);
      if (!fd.ok()) return Denied(fd.status(), file);
      Result<core::CheckpointAudit> audit =
          core::InspectFile("/proc/self/fd/" + std::to_string(fd->get()));
      if (audit.ok()) return core::GlobalsVerdict(*audit);
      if (audit.status().code() != StatusCode::kUnsupported) {
        core::Log(core::LogLevel::kError, "%s: %s", file.c_str(), audit.status().message().c_str());
        return Status::Corrupt(file + ": " + audit.status().message());
      }
    }
  }
  return Status::FromErrno(node->vpath + ": " + name, ENODATA);
}

std::string NodeTable::TensorFileOf(const Node& node) const {
  std::string file;
  if (!node.members.empty()) {
    file = node.members.substr(0, node.members.find('\n'));
  } else if (node.type == NodeType::kRealFile && !node.as_link && Under(node.real_path, source())) {
    file = node.real_path;
  }
  if (file.empty()) return file;
  const core::TensorFormat format = index::FormatOf(beneath(), file);
  return format == core::TensorFormat::kTorchZip || format == core::TensorFormat::kSafetensors
             ? file
             : std::string();
}

std::vector<std::string> NodeTable::ListXattr(uint64_t ino, const core::Caller* caller) {
  caller = Restrict(caller);
  Result<Node> node = Snapshot(ino);
  std::vector<std::string> names;
  if (!node.ok()) return names;
  if (caller != nullptr && !Reachable(*node, *caller).ok()) return names;
  if (!node->real_path.empty()) names.push_back(kXattrRealPath);
  if (!node->checkpoint.empty()) names.push_back(kXattrCheckpoint);
  if (!node->members.empty()) names.push_back(kXattrMembers);
  if (!TensorFileOf(*node).empty()) names.push_back(kXattrGlobals);
  return names;
}

Status NodeTable::Allowed(const core::Caller& caller, const std::string& path, int mask) const {
  // Under new/, the staging directory (the daemon's, private) stands for
  // the experiment: search permission down to the experiment, then the
  // staged entries' own modes (they belong to their writers).
  const std::string marker = std::string("/") + core::kStagingDir + "/";
  const std::string top = std::string("/") + core::kStagingDir;
  if (path.size() > top.size() && path.compare(path.size() - top.size(), top.size(), top) == 0) {
    // new/ itself: the experiment's own permissions.
    return Allowed(caller, path.substr(0, path.size() - top.size()), mask);
  }
  const size_t at = path.find(marker);
  if (at != std::string::npos) {
    const std::string experiment = path.substr(0, at);
    Status s = beneath().CheckAccess(caller, experiment, X_OK);
    if (!s.ok()) return Denied(s, path);
    std::string walked = experiment + "/" + core::kStagingDir;
    const std::string rest = path.substr(at + marker.size());
    for (size_t start = 0; start <= rest.size();) {
      size_t end = rest.find('/', start);
      if (end == std::string::npos) end = rest.size();
      walked += "/" + rest.substr(start, end - start);
      struct stat st {};
      if (Status got = beneath().Lstat(walked, &st); !got.ok()) return Denied(got, path);
      const bool last = end == rest.size();
      if (!core::ModeAllows(st, caller, last ? mask : X_OK)) {
        return Status::FromErrno(walked + ": permission denied", EACCES);
      }
      start = end + 1;
    }
    return Status::Ok();
  }
  Status s = beneath().CheckAccess(caller, path, mask);
  return s.ok() ? s : Denied(s, path);
}

Status NodeTable::MembersAllowed(const core::Caller& caller, const std::string& members) const {
  size_t start = 0;
  while (start < members.size()) {
    size_t end = members.find('\n', start);
    if (end == std::string::npos) end = members.size();
    const std::string m = members.substr(start, end - start);
    start = end + 1;
    if (m.empty()) continue;
    Status s = Allowed(caller, m, R_OK);
    if (!s.ok()) return s;
    // CheckAccess reads a final symbolic link's own mode: a member must be
    // a regular file.
    struct stat st {};
    Status got = beneath().Lstat(m, &st);
    if (!got.ok()) return Denied(got, m);
    if (!S_ISREG(st.st_mode)) return Status::FromErrno(m + ": not a regular file", EACCES);
  }
  return Status::Ok();
}

Status NodeTable::Reachable(const Node& node, const core::Caller& caller) const {
  if (!node.members.empty()) return MembersAllowed(caller, node.members);
  if (!node.checkpoint.empty()) {
    Status s = Allowed(caller, node.checkpoint, 0);
    if (!s.ok()) return s;
    struct stat st {};
    Status got = beneath().Lstat(node.checkpoint, &st);
    if (!got.ok()) return Denied(got, node.checkpoint);
    s = Allowed(caller, node.checkpoint, S_ISDIR(st.st_mode) ? R_OK | X_OK : R_OK);
    if (!s.ok()) return s;
  }
  if (!node.real_path.empty() && Under(node.real_path, source())) {
    return Allowed(caller, node.real_path, 0);  // search permission down to it
  }
  return Status::Ok();
}

bool NodeTable::StatusEntryVisible(const std::string& what, const core::Caller& caller) const {
  // Every absolute path the entry names (a real path under the source, or a
  // path of the mount) must lead to something the caller can read: its
  // deepest part that still exists (a deleted checkpoint: its experiment).
  size_t pos = 0;
  while (pos < what.size()) {
    size_t end = what.find(' ', pos);
    if (end == std::string::npos) end = what.size();
    std::string token = what.substr(pos, end - pos);
    pos = end + 1;
    while (!token.empty() && (token.back() == ':' || token.back() == ',' || token.back() == ')')) {
      token.pop_back();
    }
    if (token.empty() || token[0] != '/') continue;
    if (options_.averages != nullptr && Under(token, options_.averages->dir())) continue;
    std::string path = Under(token, source()) ? token : source() + token;
    struct stat st {};
    while (path.size() > source().size() && !beneath().Lstat(path, &st).ok()) {
      path = DirOf(path);
    }
    if (!Under(path, source()) || !beneath().Lstat(path, &st).ok()) return false;
    const int mask = S_ISDIR(st.st_mode) ? R_OK | X_OK : R_OK;
    if (!beneath().CheckAccess(caller, path, mask).ok()) return false;
  }
  return true;
}

}  // namespace ckptfs::fs
