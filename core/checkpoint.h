// The checkpoint model: what a checkpoint is, how each layout is recognised,
// and the order that "newest" and "best" rest on (DESIGN.md §1).
//
// LoadCheckpoint reads one checkpoint from disk (meta file, file list); it
// never throws, and a checkpoint whose meta cannot be parsed comes back with
// valid == false and the reason in error, never as a failed load.
#ifndef CKPTFS_CORE_CHECKPOINT_H_
#define CKPTFS_CORE_CHECKPOINT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/meta.h"
#include "core/status.h"

namespace ckptfs::core {

class Beneath;

enum class Layout { kSpeechBrain = 0, kNative = 1, kHuggingFace = 2, kSingleFile = 3 };

const char* LayoutName(Layout layout);

struct CheckpointFile {
  std::string name;  // relative to the checkpoint directory
  int64_t size = 0;
  int64_t mtime_ns = 0;
};

struct Checkpoint {
  std::string path;        // absolute real path: the directory, or the file
  std::string experiment;  // absolute real path of the directory holding it
  std::string name;        // last component of path
  Layout layout = Layout::kNative;
  Meta meta;
  bool valid = true;
  std::string error;   // why it is invalid
  double recency = 0;  // unixtime from meta, else newest file mtime (seconds); see RecencyOf
  std::optional<double> step;
  std::vector<CheckpointFile> files;  // for kSingleFile: the one file
  // Change detection: mtimes of the directory and meta file, meta size.
  std::string stamp;
};

// The meta file a directory layout keeps ("CKPT.yaml", ...).
const char* MetaFileName(Layout layout);

// Recognises a directory checkpoint from its name and whether each layout's
// meta file is present in it, in DESIGN.md's order. nullopt: not a checkpoint.
std::optional<Layout> DirectoryLayout(std::string_view dir_name, bool has_ckpt_yaml,
                                      bool has_meta_json, bool has_trainer_state);

// Reads the checkpoint at path (a directory of the given layout, or a single
// file, under source's root), reaching it and every file in it beneath
// source's descriptor without following a symbolic link (core/beneath.h).
// Fails only when path itself cannot be read (vanished, no access, a link
// on the way).
Result<Checkpoint> LoadCheckpoint(const Beneath& source, const std::string& path, Layout layout);

// The same for a path whose parent directory is trusted (tests and tools
// reading what they were handed): beneath the parent.
Result<Checkpoint> LoadCheckpoint(const std::string& path, Layout layout);

// A meta unixtime further than this ahead of the daemon's clock is not
// trusted for recency: anyone who can write a checkpoint could otherwise
// make it "newest" for ever and push real ones out of keep_last.
inline constexpr int64_t kMaxFutureUnixtimeSeconds = 86400;

// The recency of the checkpoint at path (DESIGN.md §1, §6): its meta
// unixtime, unless missing or more than kMaxFutureUnixtimeSeconds after now;
// then newest_mtime (the newest file's mtime, seconds), and a future
// unixtime is logged once per path as a warning.
double RecencyOf(const std::string& path, std::optional<double> unixtime, double newest_mtime,
                 double now);

// The stamp LoadCheckpoint would record, from a couple of stat calls: if it
// equals the stored one, the checkpoint need not be reloaded.
Result<std::string> CheckpointStamp(const Beneath& source, const std::string& path, Layout layout);

// A key under which plain byte order is natural order:
// "checkpoint-5000" < "checkpoint-10000", "a2" < "a10".
std::string NaturalSortKey(std::string_view name);

// The first of global_step, step, epoch, index that is numeric.
std::optional<double> StepOf(const Meta& meta);

// "newer than" as DESIGN.md §1 orders recency: recency, then step, then name.
bool IsNewer(const Checkpoint& a, const Checkpoint& b);

// The stable alias under which a single-file checkpoint's one file also
// appears: "checkpoint" + its extension.
std::string SingleFileAlias(std::string_view file_name);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_CHECKPOINT_H_
