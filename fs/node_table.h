// The mount's inode table: what every inode the kernel knows stands for, and
// the testable logic behind each FUSE callback (lookup, getattr, readdir,
// open, readlink, xattrs, and the writes under new/) and behind cache
// invalidation. No libfuse in this header.
//
// An inode is a (mount path, real path) pair: when a view such as latest/
// moves, the same name resolves to a new inode, so the kernel never mixes the
// pages of two files. Inodes live while the kernel holds a lookup on them.
// Thread-safety: all methods may be called concurrently; one internal mutex
// guards the table and is never held while the index is queried.
//
// Callers (docs/DESIGN.md, "Security"): the request methods take the user
// who asks (nullptr: unrestricted, for the daemon itself and tests). With
// options.multi_user (the mount has allow_other), a caller other than root
// sees through views only what it could read in the source; every open of a
// real file re-checks its access (core::Beneath::CheckAccess) and opens it
// beneath the source's descriptor, never by a path string; view entries get
// timeout 0, since the kernel's caches are shared by all users. Without
// multi_user nothing is filtered (only the mounting user reaches the mount),
// but real files are still opened beneath the source.
#ifndef CKPTFS_FS_NODE_TABLE_H_
#define CKPTFS_FS_NODE_TABLE_H_

#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/average_cache.h"
#include "core/beneath.h"
#include "core/status.h"
#include "fs/mount_status.h"
#include "index/index.h"
#include "index/resolver.h"

namespace ckptfs::fs {

class Committer;

inline constexpr uint64_t kRootIno = 1;
// Entries and attributes the kernel may cache until told otherwise (views
// and watched directories are invalidated explicitly).
inline constexpr double kLongTimeout = 86400;
// Paths no watcher covers (inside a checkpoint's subdirectories).
inline constexpr double kShortTimeout = 1;
// How often a lookup resolves a name whose view lost its checkpoint (or met
// an index change) meanwhile: each retry follows a deletion that happened,
// so more than a few in a row means deletions faster than lookups.
inline constexpr int kLookupAttempts = 4;

struct NodeAttr {
  struct stat st {};
  double timeout = kShortTimeout;
};

struct OpenedFile {
  int fd = -1;          // real file, owned by the caller once returned
  std::string content;  // generated file (index.json)
  bool generated = false;
  bool keep_cache = false;  // same real file, size and mtime as at the last open
  std::string real_path;    // what Released must be told
  bool writer = false;      // opened for writing (under new/)
};

struct Invalidation {
  bool entry = false;  // true: forget name in parent; false: forget inode ino
  uint64_t parent = 0;
  std::string name;
  uint64_t ino = 0;
};

struct NodeTableOptions {
  bool links = false;  // --links: view entries are symbolic links to real paths
  // --direct-new: new/NAME directories are symbolic links into the staging area.
  bool direct_new = false;
  // Where avg/ files are computed and kept; nullptr: avg/ files are EOPNOTSUPP.
  core::AverageCache* averages = nullptr;
  // Told about writes under new/; nullptr: new/ is read-only.
  Committer* committer = nullptr;
  // Whether changes in a real directory are reported (long timeouts are then safe).
  std::function<bool(const std::string& dir)> is_watched;
  // Sends an invalidation later, from a thread that is not a request handler.
  std::function<void(Invalidation)> reinvalidate;
  // Serves /.ckptfs-status and is told of averages served; nullptr: no status file.
  MountStatus* status = nullptr;
  // The mount has allow_other: other users reach it, views answer per caller.
  bool multi_user = false;
};

class NodeTable {
 public:
  NodeTable(index::Index* index, NodeTableOptions options);

  // Resolves name in parent; on success the inode's lookup count grows by one.
  // redirect=false: never a --direct-new symbolic link (for mkdir's answer).
  core::Result<NodeAttr> Lookup(uint64_t parent, const std::string& name, bool redirect = true,
                                const core::Caller* caller = nullptr);
  // Counts index changes (ViewsChanged, PathChanged). Read it before Lookup
  // and pass it to AfterLookupReply once the reply is sent: a lookup that
  // raced with a change is invalidated again (options.reinvalidate), so the
  // kernel never keeps an entry resolved before the change.
  uint64_t generation() const { return generation_.load(); }
  void AfterLookupReply(uint64_t parent, const std::string& name, uint64_t generation);
  core::Result<NodeAttr> GetAttr(uint64_t ino);
  void Forget(uint64_t ino, uint64_t nlookup);
  core::Result<std::vector<index::DirEntry>> ReadDir(uint64_t ino,
                                                     const core::Caller* caller = nullptr);
  // Read-only outside new/: any write access there is kPermission (EROFS).
  // A caller who may not access the file with the open's mode: EACCES.
  core::Result<OpenedFile> Open(uint64_t ino, int flags, const core::Caller* caller = nullptr);
  // Every Open that succeeded is matched by one Released.
  void Released(const OpenedFile& file);
  // Whether a file at or below `path` is open through the mount.
  bool IsOpen(const std::string& path) const;

  // Writing under new/ (the staging area); anywhere else kPermission. Each
  // returns the new entry's attributes, counted as a lookup.
  // What caller creates is owned by caller (uid, gid), also when the daemon
  // runs as root; nullptr: by the daemon's user.
  core::Result<NodeAttr> Mkdir(uint64_t parent, const std::string& name, mode_t mode,
                               const core::Caller* caller = nullptr);
  core::Result<std::pair<NodeAttr, OpenedFile>> Create(uint64_t parent, const std::string& name,
                                                       mode_t mode, int flags,
                                                       const core::Caller* caller = nullptr);
  // Under new/, deleting any part of a committed checkpoint deletes it whole
  // (Committer::DeleteThroughNew); the rest of an rmtree then succeeds.
  core::Status Unlink(uint64_t parent, const std::string& name, bool directory,
                      const core::Caller* caller = nullptr);
  core::Status Rename(uint64_t parent, const std::string& name, uint64_t new_parent,
                      const std::string& new_name, unsigned int flags);
  // to_set: FUSE_SET_ATTR_* bits; fd: the open file when the kernel gave one.
  core::Result<NodeAttr> SetAttr(uint64_t ino, const struct stat& attr, int to_set, int fd);
  // After data was written to an open file under new/.
  void Wrote(const OpenedFile& file);
  // Symbolic links, hard links and device nodes are never part of a
  // checkpoint: kInvalidArgument under new/ (EPERM), kPermission elsewhere.
  core::Status RefuseSpecial(uint64_t parent, const std::string& name, const char* what);
  core::Result<std::string> ReadLink(uint64_t ino);
  // user.ckptfs.real_path (the file or directory served),
  // user.ckptfs.checkpoint (the selected checkpoint) and user.ckptfs.members
  // (an average's member files, newest first, one per line), for view nodes.
  // user.ckptfs.globals, on every tensor file (PyTorch zip or safetensors:
  // real files, views, averages, safetensors/ files): core::GlobalsVerdict
  // of the file's pickle (an average's or a conversion's: its newest
  // member's), read without averaging or converting anything.
  // Only for entries the caller can reach (EACCES / an empty list otherwise).
  core::Result<std::string> GetXattr(uint64_t ino, const std::string& name,
                                     const core::Caller* caller = nullptr);
  std::vector<std::string> ListXattr(uint64_t ino, const core::Caller* caller = nullptr);

  // What the kernel must forget after the index changed in these experiments:
  // every view entry whose scope covers one of them.
  std::vector<Invalidation> ViewsChanged(const std::vector<std::string>& experiments);
  // What it must forget after `name` changed in real directory `dir`.
  std::vector<Invalidation> PathChanged(const std::string& dir, const std::string& name);

  size_t size() const;
  bool multi_user() const { return options_.multi_user; }
  const std::string& source() const { return index_->source(); }

 private:
  struct Node {
    uint64_t parent = 0;
    std::string name;
    std::string vpath;
    index::NodeType type = index::NodeType::kRealDir;
    std::string real_path;
    std::string scope;
    std::string checkpoint;
    std::string members;  // avg/ files: member files, newline-separated
    bool in_view = false;
    bool staged = false;     // under new/: writable (staging, or committed below)
    bool committed = false;  // under new/, in the experiment itself (Resolution::committed)
    // A real file's inode at lookup, part of the identity: a name whose file
    // was replaced (a new version committed) is a new kernel inode, so pages
    // cached for the old file, even by a reader still reading it, are never
    // served as the new one's.
    ino_t key_ino = 0;
    bool as_link = false;
    uint64_t nlookup = 0;
    size_t content_size = 0;
    // The real file at the last open, for keep_cache.
    bool opened = false;
    dev_t dev = 0;
    ino_t real_ino = 0;
    off_t size = 0;
    int64_t mtime_ns = 0;
    // The last attributes served: a view whose checkpoint was just deleted
    // answers with them until the invalidation that follows reaches the kernel.
    bool has_last = false;
    struct stat last {};
  };

  // *view: the name was resolved through a view (its failure may be a
  // checkpoint deleted meanwhile, worth resolving again).
  core::Result<NodeAttr> LookupOnce(uint64_t parent, const std::string& name, bool redirect,
                                    const core::Caller* caller, bool* view);
  // The caller whose access is checked: nullptr when unrestricted (not
  // multi_user, or root).
  const core::Caller* Restrict(const core::Caller* caller) const {
    return options_.multi_user && caller != nullptr && caller->uid != 0 ? caller : nullptr;
  }
  // Ok when caller may access path (under the source) with mask; EACCES
  // otherwise (ENOENT when it is gone).
  core::Status Allowed(const core::Caller& caller, const std::string& path, int mask) const;
  // Ok when caller may read every member of an average (newline-separated
  // member files, each a regular file reached without a symbolic link).
  core::Status MembersAllowed(const core::Caller& caller, const std::string& members) const;
  // Ok when caller can reach node (its real path, checkpoint or members).
  core::Status Reachable(const Node& node, const core::Caller& caller) const;
  // The file whose pickle node's user.ckptfs.globals reports (an average's
  // newest member, or the real file itself), if it is a tensor file; "".
  std::string TensorFileOf(const Node& node) const;
  // Whether a status entry names only paths caller can read.
  bool StatusEntryVisible(const std::string& what, const core::Caller& caller) const;
  const core::Beneath& beneath() const { return resolver_.beneath(); }
  core::Result<NodeAttr> Remember(Node node);
  bool IsStatusFile(const Node& node) const {
    return options_.status != nullptr && node.parent == kRootIno && node.name == kStatusFile;
  }
  core::Result<Node> Snapshot(uint64_t ino) const;
  // Snapshot, with a new/ node's real path resolved again: the same name
  // moves from staging to the experiment at its commit (and back while a
  // new version is written), and its inode must follow.
  core::Result<Node> Current(uint64_t ino) const;
  // A node under new/ made writable: a committed one gets a new version in
  // staging first (truncate: a single file starts empty). Returns it again.
  core::Result<Node> Writable(uint64_t ino, const Node& node, bool truncate);
  // mkdir in a real directory outside any checkpoint (a new experiment).
  core::Status MkdirReal(const Node& parent, const std::string& name, mode_t mode,
                         const core::Caller* caller);
  // Whether new directories may be made in the real directory dir.
  bool MayCreateIn(const std::string& dir) const;
  // The staging directory a new entry named `name` in `parent` goes to.
  core::Result<std::string> StagedDir(uint64_t parent, const std::string& name, bool creating);
  core::Result<NodeAttr> AttrOf(uint64_t ino, const Node& node) const;
  void RememberAttr(uint64_t ino, const struct stat& st);  // caller holds mu_
  std::string VpathOf(const Node& parent, const std::string& name) const;
  static std::string KeyOf(const Node& node);  // identity: path, real path, selection

  index::Index* index_;
  index::Resolver resolver_;
  NodeTableOptions options_;
  const struct timespec mount_time_;

  std::atomic<uint64_t> generation_{0};

  mutable std::mutex mu_;  // guards everything below
  uint64_t next_ino_ = kRootIno + 1;
  std::unordered_map<uint64_t, Node> nodes_;
  std::unordered_map<std::string, uint64_t> by_key_;  // KeyOf(node) -> ino
  std::unordered_multimap<std::string, uint64_t> by_real_;
  std::multiset<std::string> open_;  // real paths of files open through the mount
};

// The errno a Status becomes at the FUSE edge.
int ToErrno(const core::Status& status);

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_NODE_TABLE_H_
