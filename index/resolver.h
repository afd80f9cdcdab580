// Resolves a path of the mount (a VPATH, relative to the source) to what it
// names: a real file or directory passed through, a virtual directory of the
// query namespace, a selected checkpoint's real files, an average, or a
// generated file such as index.json (DESIGN.md §2).
//
// Real entries win over virtual names of the same spelling. The resolver
// never follows a symbolic link in the middle of a path and rejects "..", so
// nothing resolves outside the source tree. Thread-safe if the Index is.
// Errors: kNotFound (ENOENT) for unknown names and selectors that match
// nothing, kInvalidArgument (EINVAL) for malformed query paths.
//
// avg/lastN/ and avg/bestN/…/ hold the newest member's files, so that
// `cp -r avg/last3 DEST` gives a whole checkpoint: a tensor file (PyTorch zip
// or safetensors, by its bytes) that every member holds is averaged
// (kAverageFile); every other file of the newest member (counter.ckpt,
// CKPT.yaml, a tensor file some member lacks) is that member's own copy.
//
// safetensors/ (at the source root, in every experiment, after where/…/)
// mirrors the namespace of the directory it is in: real entries and virtual
// names, but not new/ and not itself. In every mirrored directory a PyTorch
// zip file (by its bytes) NAME.EXT appears as NAME.safetensors with
// `convert` set (ConvertMembers are the files to convert); everything else
// appears as in the mirrored place. Name clashes, decided per directory:
// entries that are not converted keep their names and win; then the PyTorch
// files in byte order of their names each take NAME.safetensors, or
// NAME.EXT.safetensors when that is taken (model.bin -> model.safetensors
// and model.pt -> model.pt.safetensors; beside a real model.safetensors,
// model.pt -> model.pt.safetensors); one that finds both taken is left out.
//
// Callers (docs/DESIGN.md, "Security"): Resolve and List take the user who
// asks, or nullptr for "unrestricted" (the daemon itself, root, a mount
// without allow_other). A restricted caller's views select, list and resolve
// only checkpoints that user can read in the source: search permission on
// every directory from the source down to the checkpoint and read permission
// on it (a directory also needs search). Real directories are listed through
// a core::Beneath descriptor of the source, never a path string.
#ifndef CKPTFS_INDEX_RESOLVER_H_
#define CKPTFS_INDEX_RESOLVER_H_

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/averaging.h"
#include "core/beneath.h"
#include "core/checkpoint.h"
#include "core/query_path.h"
#include "core/status.h"
#include "index/index.h"

namespace ckptfs::index {

enum class NodeType {
  kRealDir,      // real_path is a directory
  kRealFile,     // real_path is a regular file
  kRealOther,    // real_path is a symbolic link, fifo, … (served as itself)
  kVirtualDir,   // a directory of the query namespace
  kIndexJson,    // content holds the generated index.json
  kAverageFile,  // avg/…/<file>: members hold the checkpoints, newest first
};

// Checkpoints written through new/ are staged in core::kStagingDir, a
// hidden directory of the experiment on its filesystem, so a commit is one
// rename. Neither the index nor the mount's listings show ckptfs's own
// directories (core::IsOwnDirName).
using core::kStagingDir;

// The staging directory for checkpoints committed into `experiment` (a path
// for messages and lookups; it is opened only through core::OpenOwnDir).
std::string StagingDir(const std::string& experiment);

struct Resolution {
  NodeType type = NodeType::kRealDir;
  std::string real_path;  // real nodes; for kAverageFile the file name inside members
  std::string scope;      // directory whose virtual namespace the path entered
  bool in_view = false;   // reached through the query namespace (read-only view)
  bool staged = false;    // new/ or below it: writable (real_path: staging, or see committed)
  // new/NAME/...: NAME is the experiment's committed checkpoint (or any real
  // entry of the experiment); real_path is in the experiment itself. A write
  // makes a new version of NAME in staging first (fs/node_table_write.cc).
  bool committed = false;
  bool new_root = false;  // new/ itself: lists staging and the experiment together
  core::Query query;      // meaningful when in_view
  std::optional<core::Checkpoint> checkpoint;  // the selected checkpoint
  std::vector<core::Checkpoint> members;       // avg/: newest first
  std::string content;                         // kIndexJson
  // Under safetensors/: the path (a VPATH) this node mirrors.
  std::string mirror_of;
  // Under safetensors/: a PyTorch zip file (kRealFile) or an average of
  // them (kAverageFile) served converted to safetensors (ConvertMembers).
  bool convert = false;
};

struct DirEntry {
  std::string name;
  bool is_dir = false;
};

class Resolver {
 public:
  // index must outlive this. Opens the source beneath which checkpoints
  // are checked; if that fails, restricted callers see no checkpoint.
  explicit Resolver(Index* index);

  core::Result<Resolution> Resolve(std::string_view vpath,
                                   const core::Caller* caller = nullptr) const;

  // The entries of a directory resolution (real or virtual), virtual root
  // names included where the directory has a query namespace. A listing
  // never shows a name that Resolve refuses: latest/ only when a checkpoint
  // matches, keys only when they are entry names (not "val/loss") and, under
  // avg/bestN/min/, only when N checkpoints hold them.
  core::Result<std::vector<DirEntry>> List(const Resolution& dir,
                                           const core::Caller* caller = nullptr) const;

  // Whether caller (nullptr: anyone) may read checkpoint c in the source.
  bool Visible(const core::Checkpoint& c, const core::Caller* caller) const;

  // The source directory, opened once (root_fd() < 0 if that failed).
  const core::Beneath& beneath() const { return beneath_; }

  // Whether `dir` (a real directory) has the virtual namespace: the source
  // root and every experiment directory.
  bool HasNamespace(const std::string& dir) const;

  // Whether `dir` (a real directory under the source) may take new/ although
  // it holds no checkpoint yet: it is neither a checkpoint nor inside one.
  // So a new run starts through the mount (mkdir -p MOUNT/asr/exp2/new).
  bool MayHaveNew(const std::string& dir) const;

  // Where new/NAME of experiment lives while it is being deleted through
  // new/ (the trash copy that the rest of an rmtree empties), if it is.
  using NewOverlay = std::function<std::optional<std::string>(const std::string& experiment,
                                                              const std::string& name)>;
  void set_new_overlay(NewOverlay overlay) { new_overlay_ = std::move(overlay); }

 private:
  // mirrored: the path is resolved for safetensors/, which mirrors neither
  // new/ nor itself.
  core::Result<Resolution> ResolvePath(std::string_view vpath, const core::Caller* caller,
                                       bool mirrored) const;
  core::Result<Resolution> ResolveQuery(const std::string& scope,
                                        const std::vector<std::string>& segments,
                                        const core::Caller* caller, bool mirrored) const;
  // avg/…/NAME: the averaged file or the newest member's own copy.
  core::Result<Resolution> ResolveAverageEntry(Resolution r, const std::string& where) const;
  // safetensors/REST, mirroring base (a VPATH, "" for the source root).
  core::Result<Resolution> ResolveMirror(const std::string& scope, const std::string& base,
                                         const std::vector<std::string>& rest,
                                         const core::Caller* caller) const;
  struct MirrorEntry {
    std::string name;    // as listed under safetensors/
    std::string source;  // the mirrored entry's name
    bool is_dir = false;
    bool convert = false;
  };
  // The entries of the mirrored directory dir (resolved from dir_vpath),
  // renamed by the clash rule above. With only_for (a name under
  // safetensors/), just the entries that can decide what that name is: a
  // lookup resolves and sniffs those few, not the whole directory.
  core::Result<std::vector<MirrorEntry>> MirrorEntries(const std::string& dir_vpath,
                                                       const Resolution& dir,
                                                       const core::Caller* caller,
                                                       const std::string* only_for = nullptr) const;
  // Whether a file resolution is a PyTorch zip (an average: its newest member).
  bool IsTorchZip(const Resolution& file) const;
  core::Result<Resolution> ResolveInside(Resolution r, const std::vector<std::string>& rest) const;
  // The first `count` checkpoints of the query's order that still exist on
  // disk: between a deletion and the rescan that follows it, the index may
  // name a checkpoint that is gone, and a view must skip it, not fail.
  core::Result<std::vector<core::Checkpoint>> SelectExisting(const std::string& scope,
                                                             const core::Query& q, int count,
                                                             const core::Caller* caller) const;
  // The virtual root's names for scope under these predicates (new/ only
  // when with_new), leaving out those a lookup would refuse.
  core::Result<std::vector<DirEntry>> VirtualRootEntries(const std::string& scope,
                                                         const std::vector<core::Predicate>& where,
                                                         bool with_new,
                                                         const core::Caller* caller) const;

  // new/'s top-level entries: staged (new versions first), then the
  // experiment's own, each name once.
  core::Result<std::vector<DirEntry>> ListNew(const Resolution& dir) const;

  Index* index_;
  core::Beneath beneath_;
  NewOverlay new_overlay_;
};

// The files an average over these members can produce: tensor files
// (.ckpt .pt .pth .bin .safetensors) and shard indexes (.index.json) that
// every member holds; for single-file checkpoints the stable alias.
std::vector<std::string> AverageableFiles(const std::vector<core::Checkpoint>& members);

// For a kAverageFile resolution: that file of each member, newest first.
std::vector<std::string> MemberFiles(const Resolution& average);

// For a resolution with convert set: the files whose conversion it serves
// (an average's member files, newest first, or the one file).
std::vector<std::string> ConvertMembers(const Resolution& converted);

// A tensor file's format by its bytes, opened beneath source (no symbolic
// link followed); kUnknown when it cannot be opened or read.
core::TensorFormat FormatOf(const core::Beneath& source, const std::string& path);

// index.json / `ls --json`: every checkpoint with meta, validity and path.
// Bytes that are not UTF-8 (in names, paths, meta) are written as
// core::DumpJson does, so a path read back names the real file.
std::string CheckpointsToJson(const std::vector<core::Checkpoint>& checkpoints);

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_RESOLVER_H_
