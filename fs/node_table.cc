#include "fs/node_table.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <ctime>

#include "core/averaging.h"
#include "core/log.h"
#include "core/pickle_audit.h"
#include "fs/committer.h"
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

// An average still running this long after it began logs its progress,
// then again at this interval.
constexpr std::chrono::seconds kAverageProgressAfter{3};
constexpr std::chrono::seconds kAverageProgressEvery{2};

bool Covers(const std::string& scope, const std::string& experiment) {
  return experiment == scope || experiment.rfind(scope + "/", 0) == 0;
}

}  // namespace

int ToErrno(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kNotFound:
      return ENOENT;
    case StatusCode::kInvalidArgument:
      return EINVAL;
    case StatusCode::kCorrupt:
      return EIO;
    case StatusCode::kIoError:
      return status.sys_errno() != 0 ? status.sys_errno() : EIO;
    case StatusCode::kUnsupported:
      return EOPNOTSUPP;
    case StatusCode::kExists:
      return EEXIST;
    case StatusCode::kPermission:
      return status.sys_errno() != 0 ? status.sys_errno() : EACCES;
  }
  return EIO;
}

NodeTable::NodeTable(index::Index* index, NodeTableOptions options)
    : index_(index), resolver_(index), options_(std::move(options)), mount_time_(Now()) {
  if (Committer* c = options_.committer) {
    resolver_.set_new_overlay([c](const std::string& experiment, const std::string& name) {
      return c->Deleting(experiment, name);
    });
  }
  Node root;
  root.vpath = "/";
  root.type = NodeType::kRealDir;
  root.real_path = index_->source();
  root.nlookup = 1;
  nodes_.emplace(kRootIno, root);
  by_real_.emplace(root.real_path, kRootIno);
}

std::string NodeTable::KeyOf(const Node& n) {
  // Under new/ a name is one inode across its commit: the path is the identity.
  const std::string file = n.key_ino != 0 ? '\0' + std::to_string(n.key_ino) : std::string();
  if (n.staged) return n.vpath + file + '\0' + (n.as_link ? "\2\1" : "\2");
  return n.vpath + '\0' + n.real_path + '\0' + n.checkpoint + file + (n.as_link ? "\1" : "");
}

std::string NodeTable::VpathOf(const Node& parent, const std::string& name) const {
  return parent.vpath == "/" ? "/" + name : parent.vpath + "/" + name;
}

Result<NodeTable::Node> NodeTable::Snapshot(uint64_t ino) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return Status::NotFound("inode " + std::to_string(ino) + " is gone");
  return it->second;
}

Result<NodeTable::Node> NodeTable::Current(uint64_t ino) const {
  Result<Node> node = Snapshot(ino);
  if (!node.ok() || !node->staged || node->as_link) return node;
  Result<index::Resolution> r = resolver_.Resolve(node->vpath, nullptr);
  if (!r.ok()) return r.status();
  node->real_path = r->real_path;
  node->type = r->type;
  node->committed = r->committed;
  return node;
}

bool NodeTable::MayCreateIn(const std::string& dir) const {
  return dir == source() || resolver_.MayHaveNew(dir);
}

Result<NodeAttr> NodeTable::Lookup(uint64_t parent_ino, const std::string& name, bool redirect,
                                   const core::Caller* caller) {
  // Every index query a lookup makes reads one snapshot of the index, so a
  // commit or a pruning that lands meanwhile cannot fail it half-way. What
  // the index cannot make consistent is the disk: a view's checkpoint can be
  // deleted (retention, or by hand) between resolving and stat. Resolving
  // again skips it (the resolver never selects a checkpoint whose directory
  // is missing), so a view lookup that met a vanished file is retried; each
  // retry answers a deletion that really happened, never a guess at timing.
  // A lookup that failed while the index changed is retried as well.
  for (int attempt = 0;; ++attempt) {
    const uint64_t generation = generation_.load();
    bool view = false;
    Result<NodeAttr> attr = LookupOnce(parent_ino, name, redirect, Restrict(caller), &view);
    const bool vanished = !attr.ok() && view && attr.status().code() == StatusCode::kIoError &&
                          attr.status().sys_errno() == ENOENT;
    const bool raced = !attr.ok() && generation != generation_.load();
    if (attr.ok() || attempt + 1 == kLookupAttempts || !(vanished || raced)) return attr;
  }
}

void NodeTable::AfterLookupReply(uint64_t parent, const std::string& name, uint64_t generation) {
  if (generation == generation_.load() || !options_.reinvalidate) return;
  // The index changed while this lookup was answered: the kernel may have
  // cached an entry resolved before the change, after that change's
  // invalidation went out. Forget it once more.
  options_.reinvalidate({true, parent, name, 0});
}

Result<NodeAttr> NodeTable::LookupOnce(uint64_t parent_ino, const std::string& name, bool redirect,
                                       const core::Caller* caller, bool* view) {
  Result<Node> parent = Snapshot(parent_ino);
  if (!parent.ok()) return parent.status();
  *view = parent->in_view;
  if (parent->type != NodeType::kRealDir && parent->type != NodeType::kVirtualDir) {
    return Status::FromErrno(parent->vpath, ENOTDIR);
  }
  if (caller != nullptr && parent->type == NodeType::kRealDir && !parent->staged &&
      Under(parent->real_path, source())) {
    // The kernel checked search permission against attributes it may have
    // cached before a chmod or a swap: check the real directory again.
    Status allowed = Allowed(*caller, parent->real_path, X_OK);
    if (!allowed.ok()) return allowed;
  }
  Node node;
  node.parent = parent_ino;
  node.name = name;
  node.vpath = VpathOf(*parent, name);
  if (IsStatusFile(node)) {
    node.type = NodeType::kIndexJson;
    return Remember(std::move(node));
  }
  Result<index::Resolution> r = resolver_.Resolve(node.vpath, caller);
  if (!r.ok()) return r.status();
  *view = *view || r->in_view;
  node.type = r->type;
  node.real_path = r->real_path;
  node.scope = r->scope;
  node.in_view = r->in_view;
  node.staged = r->staged;
  node.committed = r->committed;
  if (r->type == NodeType::kRealFile && !r->convert) {
    struct stat file {};
    if (beneath().Lstat(r->real_path, &file).ok()) node.key_ino = file.st_ino;
  }
  if (r->checkpoint) node.checkpoint = r->checkpoint->path;
  node.content_size = r->content.size();
  // Under safetensors/ only files that are not converted: a link to a real
  // directory would leave the mirror, one to a converted file name the
  // PyTorch file.
  const bool mirrored = !r->mirror_of.empty();
  node.as_link = options_.links && r->in_view &&
                 (mirrored ? r->type == NodeType::kRealFile && !r->convert
                           : r->type == NodeType::kRealDir || r->type == NodeType::kRealFile);
  // --direct-new: a checkpoint directory in new/ is a symbolic link to its
  // staging directory, so writers write the disk, not through the daemon.
  // Not for a new version of a committed checkpoint: its files start as
  // hard links to the committed ones, and only the daemon (BreakLink) keeps
  // a write from reaching those.
  if (options_.direct_new && redirect && r->staged && !r->committed &&
      r->type == NodeType::kRealDir) {
    const std::string staging = DirOf(r->real_path);
    struct stat committed {};
    node.as_link = staging == index::StagingDir(DirOf(staging)) &&  // new/NAME, not deeper
                   !beneath().Lstat(r->scope + "/" + name, &committed).ok();
  }
  if (r->type == NodeType::kAverageFile || r->convert) {
    // Computed on first lookup (stat and open need its size), then served
    // from the cache like a real file; new members give a new cache file.
    // A conversion (safetensors/) is served as an average of its members.
    if (options_.averages == nullptr) {
      return Status::Unsupported(node.vpath + ": averaging is disabled");
    }
    const std::vector<std::string> members =
        r->convert ? index::ConvertMembers(*r) : index::MemberFiles(*r);
    for (const std::string& m : members) node.members += m + "\n";
    // Only for a caller who can read every member; checked again after the
    // computation (a member swapped meanwhile) and at every open.
    if (caller != nullptr) {
      Status allowed = MembersAllowed(*caller, node.members);
      if (!allowed.ok()) return allowed;
    }
    // Averages that take more than a few seconds log their progress.
    const auto start = std::chrono::steady_clock::now();
    auto logged = start;
    const core::ProgressFn progress = [&](const core::AverageProgress& p) {
      if (std::string(p.stage) == "done" || p.total == 0) return;
      core::Log(core::LogLevel::kDebug, "%s: %.0f%%", node.vpath.c_str(),
                100.0 * static_cast<double>(p.done) / static_cast<double>(p.total));
      const auto now = std::chrono::steady_clock::now();
      if (now - start < kAverageProgressAfter || now - logged < kAverageProgressEvery) return;
      logged = now;
      core::Log(core::LogLevel::kInfo, "%s: %s, %.0f%% of %.1f MB after %.0f s", node.vpath.c_str(),
                p.stage, 100.0 * static_cast<double>(p.done) / static_cast<double>(p.total),
                static_cast<double>(p.total) / 1e6,
                std::chrono::duration<double>(now - start).count());
    };
    Result<std::string> avg = r->convert ? options_.averages->GetSafetensors(members, progress)
                                         : options_.averages->Get(members, progress);
    if (!avg.ok()) {
      // EIO for members that disagree or cannot be parsed; the log names them.
      core::Log(core::LogLevel::kError, "%s: %s", node.vpath.c_str(),
                avg.status().message().c_str());
      return avg.status().code() == StatusCode::kUnsupported
                 ? avg.status()
                 : Status::Corrupt(avg.status().message());
    }
    if (caller != nullptr) {
      Status allowed = MembersAllowed(*caller, node.members);
      if (!allowed.ok()) return allowed;
    }
    node.type = NodeType::kRealFile;
    node.real_path = *avg;
    if (options_.status != nullptr) {
      options_.status->Record(EventKind::kAverage,
                              node.vpath + (r->convert ? " converted (" : " (") +
                                  std::to_string(members.size()) + " members) -> " + *avg);
    }
  }
  return Remember(std::move(node));
}

// Counts a lookup of `node`: the existing inode of the same identity, or a new one.
Result<NodeAttr> NodeTable::Remember(Node node) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string key = KeyOf(node);
  uint64_t ino;
  auto it = by_key_.find(key);
  if (it != by_key_.end()) {
    ino = it->second;
    Node& existing = nodes_[ino];
    existing.content_size = node.content_size;
    if (existing.staged && existing.real_path != node.real_path) {
      // Committed (or versioned) since the last lookup: same inode, new place.
      auto range = by_real_.equal_range(existing.real_path);
      for (auto r2 = range.first; r2 != range.second; ++r2) {
        if (r2->second == ino) {
          by_real_.erase(r2);
          break;
        }
      }
      by_real_.emplace(node.real_path, ino);
      existing.real_path = node.real_path;
      existing.type = node.type;
      existing.committed = node.committed;
    }
    existing.nlookup++;
    node = existing;
  } else {
    ino = next_ino_++;
    node.nlookup = 1;
    nodes_.emplace(ino, node);
    by_key_.emplace(key, ino);
    if (!node.real_path.empty()) by_real_.emplace(node.real_path, ino);
  }
  Result<NodeAttr> attr = AttrOf(ino, node);
  if (attr.ok()) RememberAttr(ino, attr->st);
  if (!attr.ok()) {
    // Vanished between resolving and stat: undo the lookup.
    Node& n = nodes_[ino];
    if (--n.nlookup == 0) {
      by_key_.erase(key);
      auto range = by_real_.equal_range(n.real_path);
      for (auto r2 = range.first; r2 != range.second; ++r2) {
        if (r2->second == ino) {
          by_real_.erase(r2);
          break;
        }
      }
      nodes_.erase(ino);
    }
  }
  return attr;
}

Result<NodeAttr> NodeTable::GetAttr(uint64_t ino) {
  Result<Node> node = Current(ino);
  if (!node.ok()) return node.status();
  Result<NodeAttr> attr = AttrOf(ino, *node);
  if (attr.ok() && (attr->timeout > 0 || node->key_ino != 0)) {
    std::lock_guard<std::mutex> lock(mu_);
    RememberAttr(ino, attr->st);
  }
  return attr;
}

void NodeTable::RememberAttr(uint64_t ino, const struct stat& st) {
  auto it = nodes_.find(ino);
  if (it == nodes_.end() || (!it->second.in_view && it->second.key_ino == 0)) return;
  it->second.has_last = true;
  it->second.last = st;
}

void NodeTable::Forget(uint64_t ino, uint64_t nlookup) {
  if (ino == kRootIno) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return;
  Node& n = it->second;
  n.nlookup = n.nlookup > nlookup ? n.nlookup - nlookup : 0;
  if (n.nlookup > 0) return;
  by_key_.erase(KeyOf(n));
  auto range = by_real_.equal_range(n.real_path);
  for (auto r = range.first; r != range.second; ++r) {
    if (r->second == ino) {
      by_real_.erase(r);
      break;
    }
  }
  nodes_.erase(it);
}

Result<std::vector<index::DirEntry>> NodeTable::ReadDir(uint64_t ino, const core::Caller* caller) {
  caller = Restrict(caller);
  Result<Node> node = Snapshot(ino);
  if (!node.ok()) return node.status();
  Result<index::Resolution> r = resolver_.Resolve(node->vpath, caller);
  if (!r.ok()) return r.status();
  if (r->type != NodeType::kRealDir && r->type != NodeType::kVirtualDir) {
    return Status::FromErrno(node->vpath, ENOTDIR);
  }
  if (caller != nullptr && r->type == NodeType::kRealDir) {
    Status allowed = Allowed(*caller, r->real_path, R_OK | X_OK);
    if (!allowed.ok()) return allowed;
  }
  Result<std::vector<index::DirEntry>> entries = resolver_.List(*r, caller);
  if (!entries.ok() && entries.status().code() == StatusCode::kPermission) {
    return Denied(entries.status(), r->real_path);
  }
  return entries;
}

Result<OpenedFile> NodeTable::Open(uint64_t ino, int flags, const core::Caller* caller) {
  caller = Restrict(caller);
  Result<Node> node = Current(ino);
  if (!node.ok()) return node.status();
  const bool writing = (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) != 0;
  if (writing && (!node->staged || options_.committer == nullptr)) {
    return Status::ReadOnly(node->vpath + ": read-only (write checkpoints through new/)");
  }
  // Held until the committer knows of this writer (OpenedForWrite below).
  std::shared_lock<std::shared_mutex> writing_guard;
  if (writing) writing_guard = options_.committer->Writing();
  if (writing && node->type == NodeType::kRealFile) {
    if (caller != nullptr) {
      const int mask = (flags & O_ACCMODE) == O_RDONLY   ? W_OK
                       : (flags & O_ACCMODE) == O_WRONLY ? W_OK
                                                         : R_OK | W_OK;
      if (Status allowed = Allowed(*caller, node->real_path, mask); !allowed.ok()) return allowed;
    }
    // Readers of the committed version keep it whole: the write goes to a
    // new version, and to a file of its own there.
    node = Writable(ino, *node, (flags & O_TRUNC) != 0);
    if (!node.ok()) return node.status();
  }
  OpenedFile f;
  f.real_path = node->real_path;
  f.writer = writing;
  switch (node->type) {
    case NodeType::kRealFile: {
      const int open_flags = writing ? (flags & (O_ACCMODE | O_TRUNC | O_APPEND)) : O_RDONLY;
      const bool average = !node->members.empty();
      // The inode and its attributes may be cached from before a chmod or
      // a swap: every open checks again, as the caller, and opens beneath
      // the source's descriptor (a symbolic link at any component refused).
      Status allowed = Status::Ok();
      if (caller != nullptr) {
        const int mask = (flags & O_ACCMODE) == O_RDONLY   ? R_OK
                         : (flags & O_ACCMODE) == O_WRONLY ? W_OK
                                                           : R_OK | W_OK;
        allowed = average ? MembersAllowed(*caller, node->members)
                          : Allowed(*caller, node->real_path, mask);
      }
      Result<core::ScopedFd> fd = core::ScopedFd();
      if (!allowed.ok()) {
        fd = allowed;
      } else if (average) {  // the daemon's own cache file, outside the source
        const int raw = ::open(node->real_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        fd = raw >= 0 ? Result<core::ScopedFd>(core::ScopedFd(raw))
                      : Result<core::ScopedFd>(Status::FromErrno(node->real_path, errno));
      } else {
        fd = beneath().OpenAt(node->real_path, open_flags | O_NOFOLLOW);
      }
      if (!fd.ok()) {
        const Status& e = fd.status();
        const bool gone = e.code() == StatusCode::kNotFound || e.sys_errno() == ENOENT;
        if (gone && node->in_view) {
          // The view's checkpoint went away after the kernel looked it up
          // (pruned, or deleted on disk). ESTALE makes the kernel walk the
          // path again, forcing fresh lookups, so the open lands on what the
          // view selects now instead of failing.
          return Status::FromErrno(node->real_path, ESTALE);
        }
        if (e.code() == StatusCode::kPermission) return Denied(e, node->real_path);
        return e;
      }
      f.fd = fd->release();
      struct stat st {};
      if (::fstat(f.fd, &st) != 0) {
        int err = errno;
        ::close(f.fd);
        return Status::FromErrno(node->real_path, err);
      }
      if (!writing && node->key_ino != 0 && st.st_ino != node->key_ino) {
        // Replaced between the kernel's lookup and this open (a new version
        // committed): this inode's size and pages are the old file's.
        // ESTALE makes the kernel look the name up again and reopen.
        ::close(f.fd);
        return Status::FromErrno(node->real_path, ESTALE);
      }
      const int64_t mtime_ns =
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
      std::lock_guard<std::mutex> lock(mu_);
      auto it = nodes_.find(ino);
      if (it != nodes_.end()) {
        Node& n = it->second;
        f.keep_cache = n.opened && n.dev == st.st_dev && n.real_ino == st.st_ino &&
                       n.size == st.st_size && n.mtime_ns == mtime_ns;
        n.opened = true, n.dev = st.st_dev, n.real_ino = st.st_ino, n.size = st.st_size,
        n.mtime_ns = mtime_ns;
      }
      if (writing || node->staged) f.keep_cache = false;
      open_.insert(f.real_path);
      if (writing) options_.committer->OpenedForWrite(f.real_path);
      return f;
    }
    case NodeType::kIndexJson: {
      f.generated = true;
      if (IsStatusFile(*node)) {
        if (caller != nullptr && caller->uid != ::geteuid()) {
          const core::Caller who = *caller;
          f.content = options_.status->ToJson(
              index_, [&](const std::string& what) { return StatusEntryVisible(what, who); });
        } else {
          f.content = options_.status->ToJson(index_);
        }
        return f;
      }
      Result<index::Resolution> r = resolver_.Resolve(node->vpath, caller);
      if (!r.ok()) return r.status();
      f.content = std::move(r->content);
      return f;
    }
    case NodeType::kAverageFile:  // lookups turn these into cached real files
      return Status::Unsupported(node->vpath + ": averaging is disabled");
    case NodeType::kRealDir:
    case NodeType::kVirtualDir:
      return Status::FromErrno(node->vpath, EISDIR);
    case NodeType::kRealOther:
      break;
  }
  return Status::FromErrno(node->vpath, EACCES);
}

Result<std::string> NodeTable::ReadLink(uint64_t ino) {
  Result<Node> node = Snapshot(ino);
  if (!node.ok()) return node.status();
  if (node->as_link) return node->real_path;
  if (node->type != NodeType::kRealOther) return Status::FromErrno(node->vpath, EINVAL);
  char buf[4096];
  auto parent = beneath().OpenParent(node->real_path);  // no link above it followed
  if (!parent.ok()) return Denied(parent.status(), node->real_path);
  ssize_t n = ::readlinkat(parent->first.get(), parent->second.c_str(), buf, sizeof(buf));
  if (n < 0) return Status::FromErrno(node->real_path, errno);
  return std::string(buf, static_cast<size_t>(n));
}

std::vector<Invalidation> NodeTable::ViewsChanged(const std::vector<std::string>& experiments) {
  generation_.fetch_add(1);
  std::vector<Invalidation> out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [ino, n] : nodes_) {
    if (!n.in_view) continue;
    bool hit = false;
    for (const std::string& e : experiments) hit = hit || Covers(n.scope, e);
    if (!hit) continue;
    out.push_back({true, n.parent, n.name, 0});
    out.push_back({false, 0, "", ino});
  }
  return out;
}

std::vector<Invalidation> NodeTable::PathChanged(const std::string& dir, const std::string& name) {
  generation_.fetch_add(1);
  std::vector<Invalidation> out;
  const std::string path = name.empty() ? dir : dir + "/" + name;
  std::lock_guard<std::mutex> lock(mu_);
  auto range = by_real_.equal_range(path);
  for (auto it = range.first; it != range.second; ++it) {
    out.push_back({false, 0, "", it->second});
    // A view onto a path that changed may now select something else.
    const Node& n = nodes_.at(it->second);
    if (n.in_view) out.push_back({true, n.parent, n.name, 0});
  }
  if (!name.empty()) {
    range = by_real_.equal_range(dir);
    for (auto it = range.first; it != range.second; ++it) {
      out.push_back({true, it->second, name, 0});
      out.push_back({false, 0, "", it->second});
    }
  }
  return out;
}

size_t NodeTable::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return nodes_.size();
}

}  // namespace ckptfs::fs
