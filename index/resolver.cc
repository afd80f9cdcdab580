#include "index/resolver.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "core/json_text.h"
#include "core/retention.h"

namespace ckptfs::index {

using core::Checkpoint;
using core::Query;
using core::QueryNode;
using core::Result;
using core::Status;

namespace {

// Upper bound on how many checkpoints an index.json or a listing loads.
constexpr int kMaxListed = 1000000;

std::string Describe(const std::vector<std::string>& segments) {
  std::string out;
  for (const std::string& s : segments) out += "/" + s;
  return out.empty() ? "/" : out;
}

NodeType TypeOf(const struct stat& st) {
  if (S_ISDIR(st.st_mode)) return NodeType::kRealDir;
  if (S_ISREG(st.st_mode)) return NodeType::kRealFile;
  return NodeType::kRealOther;
}

nlohmann::ordered_json MetaToJson(const core::Meta& meta) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [key, value] : meta.entries) {
    switch (value.type) {
      case core::MetaType::kNumber:
        if (std::isfinite(value.number)) {
          out[key] = value.number;
        } else {
          out[key] = value.text;  // JSON has no NaN or infinity
        }
        break;
      case core::MetaType::kBool:
        out[key] = value.number != 0;
        break;
      case core::MetaType::kString:
        out[key] = value.text;
        break;
    }
  }
  return out;
}

// Whether `name` can be a directory entry: what the kernel accepts from a
// listing and what a lookup can ask for. Meta keys such as "val/loss" cannot.
bool IsEntryName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.size() <= core::kMaxNameBytes &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

bool HasFile(const Checkpoint& c, const std::string& name) {
  return std::any_of(c.files.begin(), c.files.end(),
                     [&](const core::CheckpointFile& f) { return f.name == name; });
}

bool EndsWith(const std::string& s, std::string_view tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

core::TensorFormat FormatOf(const core::Beneath& source, const std::string& path) {
  Result<core::ScopedFd> fd = source.OpenAt(path, O_RDONLY | O_NOFOLLOW);
  if (!fd.ok()) return core::TensorFormat::kUnknown;
  Result<core::TensorFormat> format =
      core::DetectFormat("/proc/self/fd/" + std::to_string(fd->get()));
  return format.ok() ? *format : core::TensorFormat::kUnknown;
}

std::string StagingDir(const std::string& experiment) { return experiment + "/" + kStagingDir; }

Resolver::Resolver(Index* index) : index_(index) {
  Result<core::Beneath> b = core::Beneath::Open(index_->source());
  if (b.ok()) beneath_ = std::move(*b);
}

bool Resolver::Visible(const Checkpoint& c, const core::Caller* caller) const {
  if (caller == nullptr) return true;
  if (beneath_.root_fd() < 0) return false;  // fail closed
  const int mask = c.layout == core::Layout::kSingleFile ? R_OK : R_OK | X_OK;
  if (!beneath_.CheckAccess(*caller, c.path, mask).ok()) return false;
  // CheckAccess reads a final symbolic link's own mode: the checkpoint must
  // be the real thing, not a link put in its place.
  struct stat st {};
  return beneath_.Lstat(c.path, &st).ok() && !S_ISLNK(st.st_mode);
}

bool Resolver::HasNamespace(const std::string& dir) const {
  return dir == index_->source() || index_->IsExperiment(dir);
}

bool Resolver::MayHaveNew(const std::string& dir) const {
  const std::string& source = index_->source();
  if (dir.size() <= source.size() || dir.compare(0, source.size() + 1, source + "/") != 0) {
    return false;
  }
  for (std::string p = dir; p.size() > source.size(); p = p.substr(0, p.rfind('/'))) {
    if (index_->Find(p).ok()) return false;  // a checkpoint, or inside one
  }
  return true;
}

Result<std::vector<DirEntry>> Resolver::ListNew(const Resolution& dir) const {
  std::vector<DirEntry> out;
  std::set<std::string> seen;
  for (const std::string& from : {StagingDir(dir.scope), dir.scope}) {
    Result<core::ScopedFd> fd = beneath_.OpenAt(from, O_RDONLY | O_DIRECTORY);
    if (!fd.ok()) {
      if (from == dir.scope) return fd.status();
      continue;  // nothing staged yet
    }
    DIR* d = ::fdopendir(fd->get());
    if (d == nullptr) return Status::FromErrno(from, errno);
    fd->release();  // the DIR owns it now
    std::unique_ptr<DIR, int (*)(DIR*)> guard(d, ::closedir);
    while (struct dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == ".." || core::IsOwnDirName(name)) continue;
      if (!seen.insert(name).second) continue;  // a new version hides the committed one
      bool is_dir = e->d_type == DT_DIR;
      if (e->d_type == DT_UNKNOWN) {
        struct stat st {};
        is_dir =
            ::fstatat(::dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
      }
      out.push_back({std::move(name), is_dir});
    }
  }
  return out;
}

Result<Resolution> Resolver::Resolve(std::string_view vpath, const core::Caller* caller) const {
  return ResolvePath(vpath, caller, false);
}

Result<Resolution> Resolver::ResolvePath(std::string_view vpath, const core::Caller* caller,
                                         bool mirrored) const {
  Result<std::vector<std::string>> segments = core::SplitPath(vpath);
  if (!segments.ok()) return segments.status();
  Resolution r;
  r.real_path = index_->source();
  for (size_t i = 0; i < segments->size(); ++i) {
    const std::string& seg = (*segments)[i];
    if (core::IsOwnDirName(seg))
      return Status::NotFound(r.real_path + "/" + seg + ": no such file or directory");
    std::string next = r.real_path + "/" + seg;
    struct stat st {};
    if (beneath_.Lstat(next, &st).ok()) {
      NodeType type = TypeOf(st);
      const bool last = i + 1 == segments->size();
      if (type != NodeType::kRealDir && !last) {
        return Status::NotFound(next + ": not a directory");
      }
      r.real_path = std::move(next);
      r.type = type;
      continue;
    }
    if (core::IsVirtualRootName(seg) &&
        (HasNamespace(r.real_path) || (seg == "new" && MayHaveNew(r.real_path)))) {
      std::vector<std::string> rest(segments->begin() + static_cast<std::ptrdiff_t>(i),
                                    segments->end());
      return ResolveQuery(r.real_path, rest, caller, mirrored);
    }
    return Status::NotFound(next + ": no such file or directory");
  }
  return r;
}

Result<Resolution> Resolver::ResolveQuery(const std::string& scope,
                                          const std::vector<std::string>& segments,
                                          const core::Caller* caller, bool mirrored) const {
  Result<Query> q = core::ParseQuery(segments);
  if (!q.ok()) return q.status();
  Resolution r;
  r.scope = scope;
  r.in_view = true;
  r.query = *q;
  r.type = NodeType::kVirtualDir;
  const std::string where = scope + Describe(segments);
  switch (q->node) {
    case QueryNode::kRoot:
    case QueryNode::kWhere:
    case QueryNode::kBest:
    case QueryNode::kBestOrder:
    case QueryNode::kTop:
    case QueryNode::kTopK:
    case QueryNode::kTopOrder:
    case QueryNode::kAvg:
    case QueryNode::kAvgBest:
    case QueryNode::kAvgBestOrder:
      return r;
    case QueryNode::kTopKey: {
      Result<std::vector<Checkpoint>> top = SelectExisting(scope, *q, q->k, caller);
      if (!top.ok()) return top.status();
      if (top->empty()) return Status::NotFound(where + ": no checkpoint has numeric " + q->key);
      r.members = std::move(*top);
      return r;
    }
    case QueryNode::kSelected: {
      const int rank = q->selector == core::Selector::kLatest ? 1 : q->rank;
      Result<std::vector<Checkpoint>> chosen = SelectExisting(scope, *q, rank, caller);
      if (!chosen.ok()) return chosen.status();
      if (static_cast<int>(chosen->size()) < rank) {
        return Status::NotFound(where + ": no checkpoint matches");
      }
      r.checkpoint = std::move((*chosen)[static_cast<size_t>(rank - 1)]);
      return ResolveInside(std::move(r), q->rest);
    }
    case QueryNode::kAverage: {
      Result<std::vector<Checkpoint>> members = SelectExisting(scope, *q, q->n, caller);
      if (!members.ok()) return members.status();
      if (static_cast<int>(members->size()) < q->n) {
        return Status::NotFound(where + ": " + std::to_string(members->size()) +
                                " checkpoint(s) match, the average needs " + std::to_string(q->n));
      }
      // Newest first, whatever order selected them.
      std::sort(members->begin(), members->end(), core::IsNewer);
      r.members = std::move(*members);
      if (q->rest.empty()) return r;
      return ResolveAverageEntry(std::move(r), where);
    }
    case QueryNode::kSafetensors: {
      if (mirrored) return Status::NotFound(where + ": safetensors/ does not mirror itself");
      // The VPATH safetensors/ mirrors: the scope's, then where/… if any.
      std::string base = scope.substr(index_->source().size());
      for (size_t i = 0; i + q->rest.size() + 1 < segments.size(); ++i) base += "/" + segments[i];
      return ResolveMirror(scope, base, q->rest, caller);
    }
    case QueryNode::kNew: {
      if (mirrored) return Status::NotFound(where + ": safetensors/ does not mirror new/");
      if (!q->where.empty())
        return Status::InvalidArgument(where + ": new/ takes no where/ predicates");
      r.in_view = false;
      r.staged = true;
      r.type = NodeType::kRealDir;
      struct stat st {};
      if (q->rest.empty()) {
        // new/ itself exists before the first write: a directory, created on demand.
        r.new_root = true;
        r.real_path = StagingDir(scope);
        if (!beneath_.Lstat(r.real_path, &st).ok()) r.type = NodeType::kVirtualDir;
        return r;
      }
      // new/NAME is, in this order: the trash copy an rmtree through new/
      // is emptying, a staged checkpoint (or a new version of a committed
      // one), or the experiment's own entry.
      const std::string& top = q->rest[0];
      if (core::IsOwnDirName(top)) return Status::NotFound(where + ": no such entry");
      std::optional<std::string> overlay;
      if (new_overlay_) overlay = new_overlay_(scope, top);
      if (overlay) {
        r.real_path = *overlay;
      } else if (beneath_.Lstat(StagingDir(scope) + "/" + top, &st).ok()) {
        r.real_path = StagingDir(scope) + "/" + top;
      } else {
        r.real_path = scope + "/" + top;
        r.committed = true;
      }
      if (Status s = beneath_.Lstat(r.real_path, &st); !s.ok()) {
        if (s.code() == core::StatusCode::kNotFound || s.sys_errno() == ENOENT) {
          return Status::NotFound(where + ": no such entry");
        }
        return s;
      }
      r.type = TypeOf(st);
      for (size_t i = 1; i < q->rest.size(); ++i) {
        if (core::IsOwnDirName(q->rest[i])) return Status::NotFound(where + ": no such entry");
        if (r.type != NodeType::kRealDir)
          return Status::NotFound(r.real_path + ": not a directory");
        r.real_path += "/" + q->rest[i];
        if (Status s = beneath_.Lstat(r.real_path, &st); !s.ok()) return s;
        r.type = TypeOf(st);
      }
      return r;
    }
    case QueryNode::kIndexJson: {
      Result<std::vector<Checkpoint>> all =
          q->where.empty()
              ? index_->List(scope)
              : index_->Select(scope, q->where, false, core::Order::kMin, "", kMaxListed);
      if (!all.ok()) return all.status();
      if (caller != nullptr) {
        all->erase(std::remove_if(all->begin(), all->end(),
                                  [&](const Checkpoint& c) { return !Visible(c, caller); }),
                   all->end());
      }
      r.type = NodeType::kIndexJson;
      r.content = CheckpointsToJson(*all);
      return r;
    }
  }
  return Status::NotFound(where);
}

Result<std::vector<Checkpoint>> Resolver::SelectExisting(const std::string& scope, const Query& q,
                                                         int count,
                                                         const core::Caller* caller) const {
  std::vector<Checkpoint> out;
  int offset = 0;
  int batch = count + 2;
  for (;;) {
    Result<std::vector<Checkpoint>> rows =
        index_->Select(scope, q.where, q.ranked, q.order, q.key, batch, offset);
    if (!rows.ok()) return rows.status();
    for (Checkpoint& c : *rows) {
      struct stat st {};
      if (!beneath_.Lstat(c.path, &st).ok()) continue;  // deleted, not rescanned yet
      if (!Visible(c, caller)) continue;                // not this caller's to see
      out.push_back(std::move(c));
      if (static_cast<int>(out.size()) == count) return out;
    }
    if (static_cast<int>(rows->size()) < batch) return out;  // no more candidates
    offset += batch;
    batch *= 2;
  }
}

Result<Resolution> Resolver::ResolveInside(Resolution r,
                                           const std::vector<std::string>& rest) const {
  const Checkpoint& c = *r.checkpoint;
  if (c.layout == core::Layout::kSingleFile) {
    if (rest.empty()) return r;  // a virtual directory of the file and its alias
    if (rest.size() == 1 && (rest[0] == c.name || rest[0] == core::SingleFileAlias(c.name))) {
      r.type = NodeType::kRealFile;
      r.real_path = c.path;
      return r;
    }
    return Status::NotFound(c.path + ": a single-file checkpoint holds only " + c.name + " and " +
                            core::SingleFileAlias(c.name));
  }
  r.real_path = c.path;
  r.type = NodeType::kRealDir;
  for (size_t i = 0; i < rest.size(); ++i) {
    if (r.type != NodeType::kRealDir) return Status::NotFound(r.real_path + ": not a directory");
    std::string next = r.real_path + "/" + rest[i];
    struct stat st {};
    if (Status s = beneath_.Lstat(next, &st); !s.ok()) return s;
    r.type = TypeOf(st);
    r.real_path = std::move(next);
  }
  return r;
}

Result<std::vector<DirEntry>> Resolver::List(const Resolution& dir,
                                             const core::Caller* caller) const {
  std::vector<DirEntry> out;
  if (dir.new_root) return ListNew(dir);
  if (!dir.mirror_of.empty() || dir.query.node == QueryNode::kSafetensors) {
    if (dir.type != NodeType::kRealDir && dir.type != NodeType::kVirtualDir) {
      return Status::InvalidArgument(dir.mirror_of + ": not a directory");
    }
    Result<Resolution> mirrored = ResolvePath(dir.mirror_of, caller, true);
    if (!mirrored.ok()) return mirrored.status();
    Result<std::vector<MirrorEntry>> entries = MirrorEntries(dir.mirror_of, *mirrored, caller);
    if (!entries.ok()) return entries.status();
    for (MirrorEntry& e : *entries) out.push_back({std::move(e.name), e.is_dir});
    return out;
  }
  if (dir.type == NodeType::kRealDir) {
    // Beneath the source's descriptor: a directory swapped for a symbolic
    // link is refused, never followed.
    Result<core::ScopedFd> fd = beneath_.OpenAt(dir.real_path, O_RDONLY | O_DIRECTORY);
    if (!fd.ok()) return fd.status();
    DIR* d = ::fdopendir(fd->get());
    if (d == nullptr) return Status::FromErrno(dir.real_path, errno);
    fd->release();  // the DIR owns it now
    std::unique_ptr<DIR, int (*)(DIR*)> guard(d, ::closedir);
    std::set<std::string> real;
    while (struct dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      bool is_dir = e->d_type == DT_DIR;
      if (e->d_type == DT_UNKNOWN) {
        struct stat st {};
        is_dir =
            ::fstatat(::dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
      }
      if (core::IsOwnDirName(name)) continue;
      real.insert(name);
      out.push_back({std::move(name), is_dir});
    }
    if (!dir.in_view && !dir.staged && HasNamespace(dir.real_path)) {
      Result<std::vector<DirEntry>> names = VirtualRootEntries(dir.real_path, {}, true, caller);
      if (!names.ok()) return names.status();
      for (DirEntry& e : *names) {
        if (real.count(e.name) == 0) out.push_back(std::move(e));
      }
    }
    return out;
  }
  if (dir.type != NodeType::kVirtualDir)
    return Status::InvalidArgument(dir.real_path + ": not a directory");
  const Query& q = dir.query;
  switch (q.node) {
    case QueryNode::kRoot: {  // new/ is not under where/
      Result<std::vector<DirEntry>> names = VirtualRootEntries(dir.scope, q.where, false, caller);
      if (!names.ok()) return names.status();
      out = std::move(*names);
      break;
    }
    case QueryNode::kNew:  // nothing staged yet
      break;
    case QueryNode::kBest:
    case QueryNode::kTopK:
    case QueryNode::kAvgBest:
      out = {{"min", true}, {"max", true}};
      break;
    case QueryNode::kBestOrder:
    case QueryNode::kTopOrder:
    case QueryNode::kAvgBestOrder: {
      // avg/bestN/min/KEY exists only where N checkpoints hold KEY.
      const int needed = q.node == QueryNode::kAvgBestOrder ? q.n : 1;
      Result<std::vector<std::string>> keys = index_->NumericKeys(dir.scope, q.where, needed);
      if (!keys.ok()) return keys.status();
      for (std::string& k : *keys) {
        if (IsEntryName(k)) out.push_back({std::move(k), true});
      }
      break;
    }
    case QueryNode::kTopKey:
      for (size_t i = 1; i <= dir.members.size(); ++i) out.push_back({std::to_string(i), true});
      break;
    case QueryNode::kSelected:  // a single-file checkpoint
      if (dir.checkpoint) {
        out.push_back({dir.checkpoint->name, false});
        out.push_back({core::SingleFileAlias(dir.checkpoint->name), false});
      }
      break;
    case QueryNode::kAverage:
      for (std::string& f : AverageableFiles(dir.members)) out.push_back({std::move(f), false});
      // The newest member's other files, its own copies (ResolveAverageEntry).
      if (!dir.members.empty() && dir.members.front().layout != core::Layout::kSingleFile) {
        for (const core::CheckpointFile& f : dir.members.front().files) {
          const bool listed = std::any_of(out.begin(), out.end(),
                                          [&](const DirEntry& e) { return e.name == f.name; });
          if (!listed && f.name.find('/') == std::string::npos) out.push_back({f.name, false});
        }
      }
      break;
    default:
      break;  // where/, top/, avg/: open-ended, nothing to list
  }
  return out;
}

Result<std::vector<DirEntry>> Resolver::VirtualRootEntries(
    const std::string& scope, const std::vector<core::Predicate>& where, bool with_new,
    const core::Caller* caller) const {
  // latest/ is the one root name that a lookup refuses when nothing matches.
  Query latest;
  latest.where = where;
  latest.node = QueryNode::kSelected;
  latest.selector = core::Selector::kLatest;
  Result<std::vector<Checkpoint>> newest = SelectExisting(scope, latest, 1, caller);
  if (!newest.ok()) return newest.status();
  std::vector<DirEntry> out;
  for (const std::string& name : core::VirtualRootNames()) {
    if (name == "latest" && newest->empty()) continue;
    if (name == "new" && !with_new) continue;
    out.push_back({name, name != "index.json"});
  }
  return out;
}

std::vector<std::string> AverageableFiles(const std::vector<Checkpoint>& members) {
  if (members.empty()) return {};
  if (members.front().layout == core::Layout::kSingleFile) {
    const std::string alias = core::SingleFileAlias(members.front().name);
    for (const Checkpoint& m : members) {
      if (m.layout != core::Layout::kSingleFile || core::SingleFileAlias(m.name) != alias)
        return {};
    }
    return {alias};
  }
  std::vector<std::string> common;
  for (const core::CheckpointFile& f : members.front().files) {
    const std::string ext = core::FileExtension(f.name);
    const bool tensor_file =
        ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".bin" || ext == ".safetensors" ||
        (f.name.size() > 11 && f.name.compare(f.name.size() - 11, 11, ".index.json") == 0);
    if (!tensor_file) continue;
    bool everywhere = true;
    for (const Checkpoint& m : members) {
      everywhere = everywhere &&
                   std::any_of(m.files.begin(), m.files.end(),
                               [&](const core::CheckpointFile& g) { return g.name == f.name; });
    }
    if (everywhere) common.push_back(f.name);
  }
  return common;
}

std::vector<std::string> MemberFiles(const Resolution& average) {
  std::vector<std::string> out;
  for (const Checkpoint& m : average.members) {
    out.push_back(m.layout == core::Layout::kSingleFile ? m.path
                                                        : m.path + "/" + average.real_path);
  }
  return out;
}

std::vector<std::string> ConvertMembers(const Resolution& converted) {
  if (converted.type == NodeType::kAverageFile) return MemberFiles(converted);
  return {converted.real_path};
}

Result<Resolution> Resolver::ResolveAverageEntry(Resolution r, const std::string& where) const {
  const std::vector<std::string>& rest = r.query.rest;
  if (rest.size() != 1) return Status::NotFound(where + ": an average is one directory of files");
  const std::string& name = rest[0];
  const Checkpoint& newest = r.members.front();
  const bool single = newest.layout == core::Layout::kSingleFile;
  const std::vector<std::string> files = AverageableFiles(r.members);
  if (std::find(files.begin(), files.end(), name) != files.end()) {
    // By its bytes: a counter.ckpt is text. A file that cannot be read is
    // averaged all the same, so that the average names the error.
    const std::string path = newest.path + "/" + name;
    struct stat st {};
    if (single || EndsWith(name, ".index.json") || !beneath_.Lstat(path, &st).ok() ||
        FormatOf(beneath_, path) != core::TensorFormat::kUnknown) {
      r.type = NodeType::kAverageFile;
      r.real_path = name;
      return r;
    }
  }
  if (single || !HasFile(newest, name)) {
    return Status::NotFound(where + ": not a file of the newest member");
  }
  r.real_path = newest.path + "/" + name;
  struct stat st {};
  if (Status s = beneath_.Lstat(r.real_path, &st); !s.ok()) return s;
  r.type = TypeOf(st);
  r.checkpoint = newest;
  r.members.clear();
  return r;
}

bool Resolver::IsTorchZip(const Resolution& file) const {
  std::string path;
  if (file.type == NodeType::kRealFile) {
    path = file.real_path;
  } else if (file.type == NodeType::kAverageFile && !file.members.empty()) {
    path = MemberFiles(file).front();
  } else {
    return false;
  }
  return FormatOf(beneath_, path) == core::TensorFormat::kTorchZip;
}

Result<Resolution> Resolver::ResolveMirror(const std::string& scope, const std::string& base,
                                           const std::vector<std::string>& rest,
                                           const core::Caller* caller) const {
  Resolution r;
  r.scope = scope;
  r.in_view = true;
  r.type = NodeType::kVirtualDir;
  r.query.node = QueryNode::kSafetensors;
  r.mirror_of = base;
  if (rest.empty()) return r;
  std::string dir_vpath = base;
  for (size_t i = 0; i + 1 < rest.size(); ++i) dir_vpath += "/" + rest[i];
  Result<Resolution> dir = ResolvePath(dir_vpath, caller, true);
  if (!dir.ok()) return dir.status();
  if (dir->staged || (dir->type != NodeType::kRealDir && dir->type != NodeType::kVirtualDir)) {
    return Status::NotFound(index_->source() + dir_vpath +
                            " (under safetensors/): not a directory");
  }
  const std::string& name = rest.back();
  std::string source_name;
  bool convert = false;
  if (!EndsWith(name, ".safetensors")) {
    // Not a converted name: the mirrored entry itself, unless it is a
    // PyTorch file (listed under its converted name instead).
    source_name = name;
  } else {
    Result<std::vector<MirrorEntry>> entries = MirrorEntries(dir_vpath, *dir, caller, &name);
    if (!entries.ok()) return entries.status();
    auto it = std::find_if(entries->begin(), entries->end(),
                           [&](const MirrorEntry& e) { return e.name == name; });
    if (it == entries->end()) {
      return Status::NotFound(index_->source() + dir_vpath +
                              " (under safetensors/): no entry converts to " + name);
    }
    source_name = it->source;
    convert = it->convert;
  }
  const std::string vpath = dir_vpath + "/" + source_name;
  Result<Resolution> child = ResolvePath(vpath, caller, true);
  if (!child.ok()) return child.status();
  if (child->staged) {
    return Status::NotFound(index_->source() + vpath + " (under safetensors/): not mirrored");
  }
  if (!convert && IsTorchZip(*child)) {
    return Status::NotFound(
        index_->source() + vpath +
        " (under safetensors/): a PyTorch file, listed by its .safetensors name");
  }
  child->scope = scope;
  child->in_view = true;
  child->mirror_of = vpath;
  child->convert = convert;
  return child;
}

Result<std::vector<Resolver::MirrorEntry>> Resolver::MirrorEntries(
    const std::string& dir_vpath, const Resolution& dir, const core::Caller* caller,
    const std::string* only_for) const {
  Result<std::vector<DirEntry>> listed = List(dir, caller);
  if (!listed.ok()) return listed.status();
  std::vector<MirrorEntry> out;
  std::set<std::string> taken;
  std::vector<std::string> torch;
  // For one name X.safetensors, what it is depends only on the entries
  // whose name or stem is X or X cut at one of its dots (the stems that
  // can compete for X.safetensors, or for the names an entry named X or
  // a prefix of it would take first): run the rule on those alone. A
  // lookup in a directory of n PyTorch files thus costs a few resolutions,
  // not n (a listing of it n^2, minutes for a few thousand files).
  std::set<std::string> stems;
  if (only_for != nullptr && EndsWith(*only_for, ".safetensors")) {
    const std::string x = only_for->substr(0, only_for->size() - 12);
    stems.insert(x);
    for (size_t dot = x.find('.', 1); dot != std::string::npos; dot = x.find('.', dot + 1)) {
      stems.insert(x.substr(0, dot));
    }
  }
  auto stem_of = [](const std::string& t) {
    const size_t dot = t.rfind('.');
    return dot == std::string::npos || dot == 0 ? t : t.substr(0, dot);
  };
  for (DirEntry& e : *listed) {
    if (!stems.empty() && stems.count(e.name) == 0 && stems.count(stem_of(e.name)) == 0) {
      continue;
    }
    // new/ and safetensors/ do not resolve here: left out.
    Result<Resolution> child = ResolvePath(dir_vpath + "/" + e.name, caller, true);
    if (!child.ok() || child->staged) continue;
    if (!e.is_dir && IsTorchZip(*child)) {
      torch.push_back(std::move(e.name));
      continue;
    }
    taken.insert(e.name);
    out.push_back({e.name, e.name, e.is_dir, false});
  }
  std::sort(torch.begin(), torch.end());
  for (std::string& t : torch) {
    const std::string stem = stem_of(t);
    for (const std::string& name : {stem + ".safetensors", t + ".safetensors"}) {
      if (name.size() > core::kMaxNameBytes || taken.count(name) != 0) continue;
      taken.insert(name);
      out.push_back({name, t, false, true});
      break;
    }
  }
  return out;
}

std::string CheckpointsToJson(const std::vector<Checkpoint>& checkpoints) {
  nlohmann::ordered_json arr = nlohmann::ordered_json::array();
  for (const Checkpoint& c : checkpoints) {
    nlohmann::ordered_json j;
    j["name"] = c.name;
    j["path"] = c.path;
    j["experiment"] = c.experiment;
    j["layout"] = core::LayoutName(c.layout);
    j["valid"] = c.valid;
    if (!c.valid) j["error"] = c.error;
    j["recency"] = c.recency;
    if (c.step) j["step"] = *c.step;
    j["meta"] = MetaToJson(c.meta);
    if (!c.meta.skipped.empty()) j["skipped_keys"] = c.meta.skipped;
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    for (const core::CheckpointFile& f : c.files) {
      files.push_back({{"name", f.name}, {"size", f.size}});
    }
    j["files"] = files;
    arr.push_back(std::move(j));
  }
  return core::DumpJson(arr, 2) + "\n";  // names and paths may be any bytes
}

}  // namespace ckptfs::index
