// Applies a retention policy to the experiments of an index: gathers each
// experiment's checkpoints with their sizes, pins and open state, decides
// with core::DecideRetention, deletes (unless a dry run) and rescans what it
// deleted. Used by `ckptfs prune` and by the mount's pruning daemon.
//
// Security (DESIGN.md §6): every file under SOURCE is reached through the
// source Beneath. Only checkpoints owned by the experiment directory's owner
// are candidates; the others are reported kept ("owned by uid N ...") and
// logged once each. An experiment whose `.ckptfs-trash` is refused by
// core::OpenOwnDir (a link, another owner's directory) is skipped: nothing
// of it is deleted, the refusal is logged (once per message) and listed in
// PruneReport::refused.
// Thread-safe if the Index is; runs of Prune on one source must not overlap
// (the daemon serialises them on its watcher thread).
#ifndef CKPTFS_INDEX_PRUNER_H_
#define CKPTFS_INDEX_PRUNER_H_

#include <functional>
#include <string>
#include <vector>

#include "core/retention.h"
#include "core/status.h"
#include "index/index.h"

namespace ckptfs::index {

struct PruneEntry {
  core::Checkpoint checkpoint;
  core::RetentionDecision decision;
  bool deleted = false;
  std::string error;  // why a decided deletion did not happen
};

struct PruneReport {
  std::vector<PruneEntry> entries;  // by experiment: candidates newest first, then ignored ones
  int deleted = 0;
  int failed = 0;
  std::vector<std::string> refused;  // experiments skipped: why, naming the path
};

// experiments: the directories to prune; empty means every experiment under
// the source. is_open: whether a checkpoint (by real path) has a file open.
core::Result<PruneReport> Prune(Index* index, const core::Beneath& source,
                                const core::RetentionPolicy& policy,
                                const std::vector<std::string>& experiments, bool dry_run,
                                const std::function<bool(const std::string&)>& is_open);

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_PRUNER_H_
