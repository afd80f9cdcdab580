// Retention policies (DESIGN.md §5): which checkpoints of an experiment to
// keep, which to delete, and why; and the crash-safe deletion itself.
//
// A policy is the union of keep rules. A checkpoint is deleted only if at
// least one rule ranks it and no rule keeps it, as SpeechBrain's
// Checkpointer.delete_checkpoints does: a checkpoint without a rule's key is
// not a candidate for that rule. Never deleted: the newest checkpoint, pinned
// ones (a `.keep` file inside the checkpoint directory, or `<file>.keep`
// beside a single-file checkpoint), invalid ones, and ones open through the
// mount. Pure decisions (DecideRetention) are separate from the deletion
// (DeleteCheckpoint), so `prune --dry-run` and tests share the same logic.
#ifndef CKPTFS_CORE_RETENTION_H_
#define CKPTFS_CORE_RETENTION_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/beneath.h"
#include "core/checkpoint.h"
#include "core/query_path.h"
#include "core/status.h"

namespace ckptfs::core {

struct KeepBest {
  Order order = Order::kMin;
  std::string key;
  int n = 0;
};

struct KeepEvery {
  std::string key;
  int64_t n = 0;  // keeps checkpoints whose numeric key is a multiple of n
};

struct RetentionPolicy {
  int keep_last = 0;  // 0: rule absent
  std::vector<KeepBest> keep_best;
  std::vector<KeepEvery> keep_every;
  int keep_hourly = 0;  // the newest checkpoint of each of the last N hours that have one
  int keep_daily = 0;
  int keep_weekly = 0;
  int64_t max_bytes = -1;  // keeps the newest checkpoints that fit in this many bytes

  bool empty() const;
  std::string ToString() const;  // "keep_last=3 keep_best=min:loss:2 ..."
};

// Command-line form: name is "--keep-last", "--keep-best" (min:KEY:N),
// "--keep-every" (KEY:N), "--keep-hourly", "--keep-daily", "--keep-weekly",
// "--max-bytes" (SIZE with K/M/G/T). kInvalidArgument names the option.
Status AddPolicyOption(const std::string& name, const std::string& value, RetentionPolicy* policy);
bool IsPolicyOption(const std::string& name);

// JSON form, the same rules: {"keep_last": 3, "keep_best": ["min:loss:2"],
// "keep_every": ["epoch:10"], "keep_daily": 7, "max_bytes": "50G"}.
Result<RetentionPolicy> ParsePolicyJson(std::string_view text, const std::string& origin);

// "20G", "512M", "1024" -> bytes.
Result<int64_t> ParseSize(const std::string& text);

struct RetentionCandidate {
  Checkpoint checkpoint;
  int64_t bytes = 0;
  bool pinned = false;
  bool open = false;  // a file of it is open through the mount
};

struct RetentionDecision {
  std::string path;
  bool keep = true;
  std::string why;  // the rule that keeps it, or the rules that rank it and let it go
};

// Decisions for the checkpoints of one experiment, in the order given.
std::vector<RetentionDecision> DecideRetention(const RetentionPolicy& policy,
                                               const std::vector<RetentionCandidate>& candidates);

// Whether the checkpoint carries a pin marker (looked up beneath source,
// never following a link).
bool IsPinned(const Beneath& source, const Checkpoint& checkpoint);

// Ownership rule (DESIGN.md §6): retention ranks, counts and deletes only the
// checkpoints owned by the experiment directory's owner. experiment_owner
// and checkpoint_owner are the st_uid of the experiment directory and of
// the checkpoint (its directory, or its single file).
inline bool CountsForRetention(uid_t experiment_owner, uid_t checkpoint_owner) {
  return experiment_owner == checkpoint_owner;
}

// Moves the checkpoint out of its experiment (into `.ckptfs-trash/` beside
// it, one renameat2 between directory descriptors), then removes it with
// RemoveTreeAt. Everything is reached beneath source without following a
// link; the trash directory is opened with OpenOwnDir (a symbolic link or a
// directory that is not the daemon's own is refused: kPermission naming
// it). A checkpoint not owned by the experiment's owner is refused too. A
// crash leaves it in the trash, never half inside the experiment;
// RemoveTrash finishes the job later.
Status DeleteCheckpoint(const Beneath& source, const Checkpoint& checkpoint);

// Moves `name` of the experiment directory exp_fd (whose path is experiment)
// into its trash (core::OpenOwnDir, made when missing) in one
// renameat2(RENAME_NOREPLACE), out of every view at once. Returns the trash
// directory and the entry's name there; removing it is the caller's.
Result<std::pair<ScopedFd, std::string>> MoveToTrashAt(int exp_fd, const std::string& experiment,
                                                       const std::string& name);
// Empties and removes experiment's trash directory. Missing: Ok. Refused by
// OpenOwnDir: kPermission naming it, and nothing is touched. Entries changed
// (mtime or ctime) less than min_age ago are left: a deletion through new/
// whose rmtree is still emptying its trash copy (fs/committer.h).
Status RemoveTrash(const Beneath& source, const std::string& experiment,
                   std::chrono::seconds min_age = std::chrono::seconds(0));

inline constexpr char kPinMarker[] = ".keep";

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_RETENTION_H_
